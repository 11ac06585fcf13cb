"""The one exception type a user can fix: it becomes one error line and exit code 2."""


class UserError(Exception):
    """Bad config, CLI, checkpoint or data path: message is shown as is, no traceback."""
