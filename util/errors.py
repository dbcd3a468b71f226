"""The project's own error type: what a script reports in one line instead of a traceback."""


class ECEError(Exception):
    """A problem with the user's input (arguments, files, folders, settings) whose message says what to do.

    Scripts catch only this type (``util.cli.run_script``): any other exception is a bug and keeps its
    traceback. Subclasses also derive from ``ValueError`` or ``FileNotFoundError`` where callers expect those.
    """


class SettingError(ECEError, ValueError):
    """A setting (command-line value, globals.yml entry) that cannot be used."""


class RequestError(ECEError, ValueError):
    """An edit request that cannot be edited (no placeholder, empty target, ...); the message names the
    request by its number and subject and says how to fix it."""


class RunError(ECEError, RuntimeError):
    """A run that cannot start or resume as asked; the message says why and what to do."""
