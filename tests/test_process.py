"""The one process runner (builder/process.py): real tools, their failures named with their own words."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from builder.errors import BuildError
from builder.process import run


def test_a_failing_tool_is_named_with_its_status_and_stderr(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-image"
    with pytest.raises(BuildError) as caught:
        run(["sfdisk", "--json", str(missing)], "reading the partition table")
    message = str(caught.value)
    assert message.startswith("reading the partition table (exit 1): ")
    assert str(missing) in message and "No such file or directory" in message  # sfdisk's own words


def test_the_command_line_names_a_failure_without_a_message(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"^e2fsck -fn .*no-fs failed \(exit 8\): "):
        run(["e2fsck", "-fn", str(tmp_path / "no-fs")])


def test_statuses_that_mean_success_and_unchecked_runs(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(bytes(4096))
    assert run(["blkid", "-p", str(empty)], ok=(0, 2)).returncode == 2  # blkid: nothing found
    assert run(["blkid", "-p", str(empty)], ok=None).returncode == 2


def test_a_tool_not_on_path_says_why_it_is_needed() -> None:
    with pytest.raises(BuildError, match=r"^mdi-no-such-tool is not on PATH \(needed for the test\)$"):
        run(["mdi-no-such-tool"], missing="needed for the test")
    with pytest.raises(FileNotFoundError):
        run(["mdi-no-such-tool"])


def test_debug_logs_every_command_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    run(["true", "a b"])
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("MDI_DEBUG", "1")
    run(["true", "a b"])
    assert capsys.readouterr().err == "[makeDiskImage] $ true 'a b'\n"


def test_a_tool_printing_bytes_that_are_not_utf8_is_still_named(tmp_path: Path) -> None:
    """e2fsck echoes the file name it was given; a name that is not UTF-8 made the runner's strict decoding
    raise UnicodeDecodeError (a traceback) instead of the tool's failure."""
    name = os.fsdecode(bytes(tmp_path) + b"/caf\xe9-\xff.img")
    with pytest.raises(BuildError) as caught:
        run(["e2fsck", "-fn", name], "checking the image")
    assert "caf\\xe9-\\xff.img" in str(caught.value)
    done = run(["e2fsck", "-fn", name], ok=None)
    assert "caf\\xe9-\\xff.img" in done.stderr
