"""The one exception type for mistakes a user can fix."""


class ShardwiseError(Exception):
    """A user-caused problem. The message names the problem and how to fix it;
    the CLI prints it as one line, without a traceback."""
