"""Writing outputs: whole or not at all, with the permissions of any other file.

Every file cpdfx writes (models, reports, checkpoints, plots) goes through
`atomic_path`: the content is written under a temporary name in the target's
folder and moved onto the target only when complete, so a failure or Ctrl-C
never leaves a half-written file nor replaces a good one.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside `path`, moved onto it if the block succeeds. The
    file gets the mode a plain open() would give it (0666 less the umask), not
    the 0600 of mkstemp. The temporary name ends like path (torch.export checks
    the suffix)."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    except OSError as err:  # named as the file asked for, not the temporary one
        raise OSError(err.errno, err.strerror, str(path)) from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path, obj) -> Path:
    """obj as indented JSON: numpy arrays as lists, numpy scalars as numbers,
    other values JSON lacks (paths, criteria) as their str()."""
    return write_text(path, json.dumps(obj, indent=1, default=_jsonable) + "\n")


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return str(value)


def cache_dir() -> Path:
    """cpdfx's cache (latency tables, demo teachers): $CPDFX_CACHE, else ~/.cache/cpdfx."""
    return Path(os.environ.get("CPDFX_CACHE") or Path.home() / ".cache" / "cpdfx")
