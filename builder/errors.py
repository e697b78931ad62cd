"""Errors the builder reports to users without a traceback."""

import signal


class UserError(Exception):
    """A problem with the user's input: reported as a message, exit status 2."""

    exit_status = 2


class SpecError(UserError):
    """The spec is invalid; carries every problem found, each naming its JSON path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid spec:\n" + "\n".join(f"  - {p}" for p in problems))


class BuildError(Exception):
    """A step failed while building (a tool failed, a check did not pass): exit status 1."""

    exit_status = 1


class OutOfHostSpace(BuildError):
    """The directory the image file is written in is full (the host's, not the image's filesystem)."""


class Interrupted(BaseException):
    """A termination signal stopped the build; a BaseException so it unwinds past `except Exception`."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_status = 128 + signum
        super().__init__(f"interrupted by {signal_name(signum)}")


def signal_name(signum: int) -> str:
    """SIGTERM, SIGRTMIN+2...: the name a signal number is known by."""
    if signal.SIGRTMIN < signum < signal.SIGRTMAX:
        return f"SIGRTMIN+{signum - signal.SIGRTMIN}"
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
