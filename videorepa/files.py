"""Files that appear whole or not at all."""

import contextlib
import filecmp
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
    completes: until then `path` stays as it was, and it never mixes an earlier writer's files with this one's. Only
    one writer per `path` at a time (the temporary names are fixed, so a killed writer's leftovers go at the next)."""
    parent, name = os.path.split(os.path.abspath(path))
    tmp, old = os.path.join(parent, f".{name}.tmp"), os.path.join(parent, f".{name}.old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.exists(path):
            os.replace(path, old)  # renames, not a delete, stand between the old folder and the new
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, old):
            shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def exclusive(path: str):
    """Holds an exclusive lock on `path`.lock (created beside it) for the block: processes that prepare the same
    folder (parallel experiment processes) do it one after another."""
    import fcntl

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(f"{os.path.abspath(path)}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def same_files(a: str, b: str) -> bool:
    """Whether two folders hold the same files (relative paths) with the same bytes."""
    def tree(root):
        return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)

    names = tree(a)
    return os.path.isdir(b) and names == tree(b) and all(
        filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False) for n in names)
