"""Files that appear whole or not at all."""

import contextlib
import os
import shutil


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


@contextlib.contextmanager
def atomic_folder(path: str):
    """Yields an empty hidden folder beside `path` that replaces `path`, and everything it held, only when the block
    completes: a crash leaves the old folder whole, and never a mix of an old run's files and a new one's."""
    parent, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(parent, f".{name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
