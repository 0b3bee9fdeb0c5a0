"""Claims: which process owns a chunk of a feature store, or a run folder, right now.

    <layout>/.<split>-<fp>.zarr.claims/<chunk>   one file per chunk being extracted (beside the store, outside Zarr)
    runs/<sweep>/<variant>/.lock                  the training that writes this run folder

A claim is a file held with an exclusive `flock`. Why `flock` and not only an O_EXCL file with a pid and a timeout:
the kernel drops the lock the moment its holder dies (exit, crash, SIGKILL, an OOM kill), so a dead holder never
blocks anyone and no timeout has to guess how long a chunk may take; a file left behind by a dead holder is simply
taken by the next claimant. The file also records who holds it (pid, host, start time, what), for the message of
whoever is refused. The lock belongs to one open file description, so two threads of one process (Dask's threaded
workers) exclude each other as two processes do.

Local file systems (and NFS, where Linux maps flock to server-side locks). On an fsspec URL (s3://...) there is
nothing to lock: claims are then no-ops and concurrent runs are not protected.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


@dataclass
class Claim:
    """A held claim (`acquired`) or a refused one, with what its file says about the holder (`holder`)."""

    path: Path
    acquired: bool
    holder: dict
    _fd: int | None = None

    def describe_holder(self) -> str:
        h = self.holder
        if not h:
            return "another process (it has not written its name yet)"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.get("since", 0)))
        return f"pid {h.get('pid')} on {h.get('host')} ({h.get('what', '?')}, since {since})"

    def release(self) -> None:
        """Remove the file while still holding the lock, then let go: a process that opened the old file before
        the unlink sees on its next try that the path is no longer its inode (`try_claim`)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = None
        self.acquired = False


def read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def try_claim(path: Path, what: str) -> Claim:
    """Claim `path` without waiting: `acquired` is True when this caller now holds it (a file left by a dead holder
    is taken over), False when a live process holds it."""
    path = Path(path)
    for _ in range(50):  # only a release racing with this open makes it go round again
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # the claims folder was removed by a run that finished the store
            path.parent.mkdir(parents=True, exist_ok=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            return Claim(path, False, read_holder(path))
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder released (unlinked) it between our open and our lock: try the new file
            os.close(fd)
            continue
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "what": what}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        return Claim(path, True, holder, fd)
    raise RuntimeError(f"could not claim {path}: it was released and re-created 50 times in a row")


@contextlib.contextmanager
def claimed(path: Path, what: str) -> Iterator[Claim]:
    """`try_claim` for a block; a held claim is released when the block ends (an exception included)."""
    claim = try_claim(path, what)
    try:
        yield claim
    finally:
        claim.release()


def sweep(folder: Path) -> None:
    """Remove the claim files nobody holds (left by dead holders), then the folder if it is empty."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        claim = try_claim(path, "sweep")
        claim.release()
    with contextlib.suppress(OSError):  # not empty: a live claim, or a new one made meanwhile
        folder.rmdir()
