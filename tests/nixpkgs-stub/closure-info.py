"""closureInfo's builder in the nixpkgs stand-in: the same three files from Nix's exportReferencesGraph JSON."""

import json
import os
from pathlib import Path

attrs_file = os.environ.get("NIX_ATTRS_JSON_FILE") or os.path.join(os.environ["NIX_BUILD_TOP"], ".attrs.json")
attrs = json.loads(Path(attrs_file).read_text())
closure = attrs["closure"]
out = Path(attrs["outputs"]["out"])
out.mkdir()
(out / "total-nar-size").write_text(f"{sum(p['narSize'] for p in closure)}\n")
lines: list[str] = []
for p in closure:
    lines += [p["path"], p["narHash"], str(p["narSize"]), "", str(len(p["references"]))] + p["references"]
(out / "registration").write_text("".join(f"{line}\n" for line in lines))
(out / "store-paths").write_text("".join(f"{p['path']}\n" for p in closure))
