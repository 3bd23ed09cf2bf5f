"""The one exception for bad input: main() prints its message on one line and exits with code 2."""


class UsageError(Exception):
    """Bad input from the user (a folder, an image, a checkpoint, an option); the message says what to fix."""


def warn(message):
    """Print a one-line warning to stderr."""
    import sys

    print(f"warning: {message}", file=sys.stderr)
