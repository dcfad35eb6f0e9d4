"""Writing files so that nothing half-written is ever seen under its final name.

``atomic_file`` writes ``<path>.partial`` under an exclusive lock and renames it when complete (a second
writer of the same output gets ``OutputBusy``; a killed writer's leftover is reused); small files
(``atomic_write_text``/``bytes``, ``atomic_create_text``) go through a unique temp file and a rename.
Every rename is made durable by syncing its folder (``fsync_dir``).
"""

import contextlib
import errno
import fcntl
import itertools
import os
import tempfile


class OutputBusy(RuntimeError):
    """Another live process is writing the same output file."""


def partial_path(path):
    """Where a shard lives while it is being written; never matched by a ``*.tar`` glob."""
    return f"{path}.partial"


def lock_or_busy(fd, busy):
    """Take an exclusive ``flock`` on ``fd`` (held until it is closed), or close it and raise ``OutputBusy(busy)``."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputBusy(busy) from None


def _open_locked(tmp, path):
    """``tmp`` opened for writing, emptied, under an exclusive ``flock`` that the writer holds until it
    closes it: a second writer of the same output is refused instead of interleaving with the first, and
    a partial file left by a killed writer (its lock gone with it) is reused."""
    for _ in range(10):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o666)  # less the umask, as open() does
        lock_or_busy(
            fd, f"{path}: another process is writing it now ({tmp} is locked); two jobs were given the same output"
        )
        try:  # the lock is on the file we opened: is that still the one named tmp (not renamed meanwhile)?
            same = os.path.samestat(os.fstat(fd), os.stat(tmp))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            return fd
        os.close(fd)
    raise OutputBusy(f"{path}: {tmp} keeps being replaced by another process")


def fsync_dir(folder):
    """Make a rename in ``folder`` durable: fsync the directory itself (POSIX keeps a renamed file's name only
    once its directory is synced). File systems that can't sync a directory (EINVAL, ENOTSUP) are left as they are."""
    fd = os.open(folder or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def replace_durably(tmp, path):
    """``os.replace(tmp, path)``, then the directory fsync that makes the new name survive a power cut."""
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_file(path, mode="wb"):
    """Open ``path + ".partial"`` (locked: see ``_open_locked``); fsync and rename it to ``path`` on success
    (and fsync the folder), remove it on any error; the lock is released only after either."""
    tmp = partial_path(path)
    stream = os.fdopen(_open_locked(tmp, path), mode)
    # The lock is held until the rename (or removal) is done: a second writer that takes it after
    # us finds ``tmp`` gone (``_open_locked`` then makes a new one), never our finished file to empty.
    try:
        yield stream
        stream.flush()
        os.fsync(stream.fileno())
        replace_durably(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    finally:
        stream.close()


def current_umask():
    """The process's umask, read without changing it (Linux), else by setting and restoring it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _fsynced_temp(path, data, mode, prefix):
    """A temp file next to ``path`` (unique name: ``prefix``) holding ``data``, fsync-ed, for the body to rename
    or link; removed on an error. ``mode``: default what open() gives under the umask (mkstemp's 0600 would
    hide sizes.json from the group's other jobs)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=os.path.basename(path))
    try:
        os.fchmod(fd, 0o666 & ~current_umask() if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        yield tmp
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_bytes(path, data, mode=None, prefix=".tmp-"):
    """Write a small file by write-to-temp + rename (fsync-ed, folder too); a unique temp name (``prefix``), so
    concurrent writers are safe."""
    with _fsynced_temp(path, data, mode, prefix) as tmp:
        replace_durably(tmp, path)


def atomic_create_text(path, text):
    """Write a new small file atomically, never replacing one: ``path`` if free, else ``<stem>-2<ext>``,
    ``-3``... (a hard link claims the name, so two writers at once never take the same). Returns the path."""
    stem, ext = os.path.splitext(path)
    with _fsynced_temp(path, text.encode(), None, ".tmp-") as tmp:
        for n in itertools.count(1):
            candidate = path if n == 1 else f"{stem}-{n}{ext}"
            try:
                os.link(tmp, candidate)
            except FileExistsError:
                continue
            except OSError:  # no hard links on this file system (some FUSE mounts): claim the name, rename over it
                try:
                    os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                except FileExistsError:
                    continue
                os.replace(tmp, candidate)
            else:
                os.remove(tmp)
            fsync_dir(os.path.dirname(os.path.abspath(candidate)))
            return candidate


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode())
