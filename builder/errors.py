"""Errors the builder reports to users without a traceback."""


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
