"""The image's writeback started beside mkfs (builder/disk/writeback.py), seen in the system calls made."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parent.parent

# Writes 64 MiB into the image with a tool while written_back runs, then lingers so the thread kicks again.
WRITER = """
import subprocess, sys
from pathlib import Path
from builder.disk.writeback import written_back
image = Path(sys.argv[1])
image.write_bytes(b"")
with written_back(image):
    subprocess.run(["dd", "if=/dev/zero", f"of={image}", "bs=1M", "count=64", "conv=notrunc", "status=none"],
                   check=True)
    subprocess.run(["sleep", "0.7"], check=True)
"""


def traced(tmp_path: Path, image: Path) -> list[str]:
    """The sync_file_range calls of the writer's process and threads (strace -f)."""
    log = tmp_path / "strace.log"
    res = subprocess.run(["strace", "-f", "-e", "trace=sync_file_range", "-o", str(log), sys.executable, "-c", WRITER,
                          str(image)], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    return [line for line in log.read_text().splitlines() if "sync_file_range(" in line]


def test_writeback_is_started_while_the_image_is_written(tmp_path: Path) -> None:
    calls = traced(tmp_path, tmp_path / "image")
    # Every INTERVAL (0.2 s) while the block runs: the whole file, start only (no wait flags).
    assert len(calls) >= 3, calls
    assert all("0, 0, SYNC_FILE_RANGE_WRITE) = 0" in line for line in calls), calls


def test_an_image_that_cannot_be_opened_only_goes_without(tmp_path: Path) -> None:
    script = WRITER.replace("with written_back(image):", "with written_back(image / 'missing'):")
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path / "image")], capture_output=True, text=True,
                         cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "image").stat().st_size == 64 << 20
