"""Files that appear whole or not at all."""

import contextlib
import os


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary name beside `path` (same extension, for writers that pick a format by it) and renames it
    onto `path` only when the block completes: a crash or error leaves no half-written file, and readers of `path`
    see the old file or the new one."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
