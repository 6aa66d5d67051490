"""User-facing errors: the CLI turns these into one line on stderr and exit code 2."""


class UserError(Exception):
    """A mistake in the user's input (a path, a value, a mismatched file), not a bug."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


class DataError(UserError):
    """A record that could be read when the run started and cannot be now (a file changed or
    was damaged under a running job): named, and the run stops at its last checkpoint unless
    ``--skip-bad-records`` replaces the record."""
