"""The one error type the command line turns into a one-line message and a non-zero exit."""


class CliError(Exception):
    """A problem with the user's input: printed as ``hifuse <command>: <message>``, exit 2."""
