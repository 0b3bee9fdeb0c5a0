"""The one base class of the errors a user can act on.

Each error of the pipeline that is the user's to fix (a config key, a dataset file, a feature store, a run folder,
a checkpoint) subclasses `SpaceClipError`, and its message names the key, file or line. The `spaceclip` command and
the flows catch `SpaceClipError` and print or report that message in one line; anything else is a bug and keeps
its traceback. Each subclass also keeps the built-in base it had before (`ValueError`, `RuntimeError`), so callers
that caught those still do.
"""


class SpaceClipError(Exception):
    """An error whose message says what the user should change; reported in one line, without a traceback."""
