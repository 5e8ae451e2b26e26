"""File helpers shared by the weights code, the engine runner and the engine builder (one definition each)."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def sha256_file(path: Path, progress=None) -> str:
    """Hex sha256 of a file, read in 16 MiB chunks; `progress(n)` is told the size of each chunk read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 24), b""):
            h.update(b)
            if progress is not None:
                progress(len(b))
    return h.hexdigest()


# Temporary files and build folders carry their writer's pid, so a later run can tell the leftovers
# of a killed writer (pid gone) from the work of one still running (concurrent writes of one output).
TEMP_MARK = "pid"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _writer_pid(name: str) -> int | None:
    head, sep, tail = name.rpartition(TEMP_MARK)
    digits = tail.split("-", 1)[0].split(".", 1)[0]
    return int(digits) if sep and head and digits.isdigit() else None


def remove_stale(folder, prefix: str) -> list[Path]:
    """Remove the entries of `folder` named `prefix...` whose writer process is gone (a SIGKILL or a
    crash leaves them). Returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        pid = _writer_pid(p.name) if p.name.startswith(prefix) else None
        if pid is None or pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def private_dir(parent, prefix: str) -> Path:
    """A fresh folder `parent/<prefix><pid>-<random>`, removable by `remove_stale` once its writer is gone."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{TEMP_MARK}{os.getpid()}-", dir=parent))


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def check_writable(path, create_parents: bool = False) -> None:
    """Raise OutputError if `path` cannot be written (before any work is done):
    its folder missing (unless `create_parents`, then the nearest existing folder must be writable),
    not a folder, or not writable; or `path` itself is a folder. Leaves nothing behind."""
    from .errors import OutputError

    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name ending in .glb")
    folder = path.parent
    if not folder.exists():
        if not create_parents:
            raise OutputError(f"{folder}: output folder does not exist (create it first)")
        while not folder.exists():
            folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"{folder}: is a file, not a folder; choose another output path")
    try:
        fd, probe = tempfile.mkstemp(prefix=f"{_temp_prefix(path)}{TEMP_MARK}{os.getpid()}-", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{folder}: cannot write here ({e.strerror or e}); choose another output path") from None


def atomic_write(path, data) -> None:
    """Write `path` so that readers see the old file or the complete new one, never a partial file:
    into a temporary file beside it, fsync, then rename. `data` is bytes-like, or a function that
    writes a file at the path it is given (savers that take a file name). The result gets the usual
    mode of a new file (0666 less the umask); on any failure, or an interrupt, the temporary file is
    removed and the exception propagates. Temporary files left by a killed writer are removed by the
    next write of the same path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, _temp_prefix(path))
    fd, tmp = tempfile.mkstemp(prefix=f"{_temp_prefix(path)}{TEMP_MARK}{os.getpid()}-", suffix=".tmp", dir=path.parent)
    try:
        if callable(data):
            os.close(fd)
            fd = None
            data(tmp)
            fd = os.open(tmp, os.O_RDONLY)
        else:
            with open(fd, "wb", closefd=False) as fh:
                fh.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600, and so may a saver that writes its own file there
        os.fsync(fd)
        os.close(fd)
        fd = None
        os.replace(tmp, path)
    except BaseException:
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


atomic_write_bytes = atomic_write  # the name the GLB writer, manifests and caches use
