"""What every root filesystem module builds from: the staged tree, store binds, owners, label, UUID and epoch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import BuildError
from ..staging.contents import ModeFix, OwnerFix


@dataclass(frozen=True)
class RootBuild:
    """Inputs of one root filesystem build (epoch is None unless deterministic)."""

    root: Path
    binds: tuple[tuple[str, str], ...]  # (store path, placeholder under root)
    owner_fixes: tuple[OwnerFix, ...]
    mode_fixes: tuple[ModeFix, ...]  # contents whose image mode differs from the staged copy's (staging/contents.py)
    label: str
    uuid: str | None
    epoch: int | None
    source_date_epoch: int
    scratch: Path

    def real_path(self, staged: str) -> str:
        """Where a staged path's bytes really are (a store path for placeholders), for tools reading sources."""
        for src, dest in self.binds:
            if staged == dest or staged.startswith(dest + "/"):
                return src + staged[len(dest):]
        return staged


class NoSpace(BuildError):
    """mkfs ran out of space: the caller grows the filesystem and tries again."""
