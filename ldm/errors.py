"""The project's one bad-input exception: scripts print it in one line and exit 2 (ldm.cli.run)."""


class UserError(Exception):
    """A problem with the user's input (a path, a value, a file's content), stated in one line."""
