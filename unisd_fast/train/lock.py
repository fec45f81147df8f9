"""One run per output folder: a lock file holding the owner's pid and host.

Created exclusively (``O_EXCL``), so of two runs started on the same ``--output-dir`` the
second finds it and refuses. A lock left by a process that no longer runs on this host (a
killed run) is taken over. Under torchrun only rank 0 takes the lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
from pathlib import Path

from .errors import OutputDirLocked

LOCK_NAME = ".unisd-train.lock"
TEMPORARY_PREFIX = ".tmp-"

log = logging.getLogger("unisd_fast.train")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(path: Path) -> tuple[int | None, str | None]:
    try:
        pid, _, host = path.read_text(encoding="utf-8").strip().partition(" ")
        return int(pid), host or None
    except (OSError, ValueError):
        return None, None


def acquire(output_dir) -> Path:
    """Take the lock of ``output_dir`` (created if needed); OutputDirLocked when a live
    process holds it."""
    path = Path(output_dir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    me = f"{os.getpid()} {socket.gethostname()}"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid, host = _owner(path)
            here = host is None or host == socket.gethostname()
            if pid is not None and (not here or pid == os.getpid() or _running(pid)):
                where = "" if here else f" on host {host}"
                raise OutputDirLocked(
                    f"output_dir {str(output_dir)!r} is in use by another run (pid {pid}{where}, "
                    f"lock file {str(path)!r}); wait for it to end or pick another --output-dir"
                ) from None
            log.warning("taking over the lock %s left by pid %s, which no longer runs", path, pid)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(me + "\n")
        return path
    raise OutputDirLocked(f"could not take the lock {str(path)!r}: other runs keep taking it")


def release(path: Path) -> None:
    """Remove the lock if this process still holds it."""
    if _owner(path)[0] == os.getpid():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def output_dir_lock(output_dir):
    """Hold the lock of ``output_dir`` (rank 0 only under torchrun) for the block, after
    removing what an interrupted run left there."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield None
        return
    path = acquire(output_dir)
    try:
        remove_temporary(output_dir)
        yield path
    finally:
        release(path)


def remove_temporary(output_dir) -> list[str]:
    """Delete the temporary folders (``.tmp-*``: checkpoints, the facts base model) a killed
    run left in ``output_dir``; only while holding its lock. Returns their names."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(TEMPORARY_PREFIX))
    for p in found:
        shutil.rmtree(p)
    if found:
        log.info("removed %d temporary folders left by an interrupted run", len(found))
    return [p.name for p in found]
