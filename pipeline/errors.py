"""The one base class of the errors a user can act on.

Each error of the pipeline that is the user's to fix (a config key, a dataset file, a feature store, a run folder,
a checkpoint) subclasses `SpaceClipError`, and its message names the key, file or line. The `spaceclip` command and
the flows catch `SpaceClipError` and print or report that message in one line; anything else is a bug and keeps
its traceback. Each subclass also keeps the built-in base it had before (`ValueError`, `RuntimeError`), so callers
that caught those still do.
"""


class SpaceClipError(Exception):
    """An error whose message says what the user should change; reported in one line, without a traceback."""


def user_errors() -> tuple[type[BaseException], ...]:
    """What the command and the flows report in one line: `SpaceClipError` and the `spaceclip` library's own errors
    that are the user's to fix (an encoder that cannot load: its name, its image_size, no Hub; an encoder that is not
    the one a decoder was trained on). `spaceclip` never imports `pipeline`, so they cannot subclass
    `SpaceClipError`; imported here when an error is being matched, so that importing this module stays cheap."""
    from spaceclip.encoder import EncoderLoadError
    from spaceclip.model import EncoderMismatchError

    return (SpaceClipError, EncoderLoadError, EncoderMismatchError)


def one_line(err: BaseException) -> str:
    """The error's message on one line (a message that wraps a lower layer's may hold line breaks)."""
    return " ".join(part.strip() for part in str(err).splitlines() if part.strip()) or type(err).__name__


class DiskFullError(SpaceClipError, OSError):
    """A write failed because its file system is full. Nothing half-written is kept: the message names the path
    and says that the same command resumes once there is space."""


def is_disk_full(err: BaseException, path=None) -> bool:
    """Whether `err` (or an error it was raised from) is ENOSPC. torch's and safetensors' writers report it in
    their own words, or not at all (torch.save to a path: "unexpected pos ..."), so a failed write is also taken
    as a full disk when the file system at `path` has (almost) no space left."""
    import errno
    import os

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    if path is None:
        return False
    try:
        folder = os.fspath(path)
        while folder and not os.path.isdir(folder):
            folder = os.path.dirname(folder)
        st = os.statvfs(folder or ".")
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1 << 20
