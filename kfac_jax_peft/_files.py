"""Atomic file writes with the permissions of an ordinary ``open``."""

from __future__ import annotations

import os
import tempfile


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: into a temporary file of the
    same folder, then ``os.replace``, so that a reader (or a kill) sees the
    old file or the new one, never a part. ``tempfile.mkstemp`` creates the
    temporary file with mode 0600; it is given ``0666 & ~umask`` (0644
    under the usual umask), the mode ``open(path, "w")`` would give."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                               prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
