"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class GptossError(Exception):
    """Bad input: a file, a config, a request or an option that cannot be used as given."""
