"""Atomic file writes, JSONL helpers and a folder lock.

Every file preftune writes goes through here: write to a temp file in the same folder, fsync, rename.
A crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import InputError, one_line


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


@contextlib.contextmanager
def _replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp file beside ``path`` to write; on success it is fsynced and renamed over ``path``
    (parallel writers of one file: the last rename wins), on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600; a report or config must be as readable as any other file
        os.close(fd)
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with _replacing(path) as tmp:
        tmp.write_bytes(text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one line and fsync; a torn last line is dropped by ``read_jsonl``."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=_json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl_lines(path: str | os.PathLike) -> list[tuple[int, Any]]:
    """(line number, value) of every non-blank line of one of preftune's JSONL files; InputError naming the
    file and line otherwise. An unparsable final line with no newline is dropped: the trace of a crash in the
    middle of ``append_jsonl``. Lines are split on ``\n`` only: U+2028 may sit inside a JSON string.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read: {e}", path=str(path)) from None
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            if i == len(lines):
                break
            raise InputError(f"invalid JSON: {e.msg} (column {e.colno})", path=str(path), line=i) from None
    return rows


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    return [row for _, row in read_jsonl_lines(path)]


def check_writable_dir(path: str | os.PathLike, *, field: str | None = None) -> None:
    """InputError unless ``path`` is a folder, or can be made one, that this process can write into.

    Called before anything is written, so a file given as ``--output`` (or a folder under a file) is one line
    and exit code 2 instead of a traceback halfway through a run, and the file is left untouched.

        check_writable_dir("runs/x", field="output")
    """
    target = Path(path).absolute()
    if target.exists() and not target.is_dir():
        raise InputError("is a file, not a folder: choose another path", path=str(path), field=field)
    probe = target
    while not probe.exists() and probe.parent != probe:  # the nearest part of the path that exists
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"cannot create a folder here: {probe} is a file", path=str(path), field=field)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"cannot write here: {probe} is not writable by this user", path=str(path), field=field)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        _honour_umask(tmp)
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _honour_umask(folder: Path) -> None:
    """mkdtemp makes 0700 and some writers 0600: give the folder and what is in it the modes the umask gives any
    new file, so a teammate or a serving user can read an adapter or a merged model."""
    mask = _umask()
    for p in (folder, *folder.rglob("*")):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


class FolderLock:
    """An exclusive lock on a folder, so two processes never write one run: ``flock`` on its ``.lock`` file.

    The kernel releases the lock when its holder dies, however it dies (kill -9 included), so a lock is never
    stale; the file (holding the pid, for the message) is removed on the way out when the folder still allows it.
    A lock is not re-entrant: a second FolderLock on the same folder fails in the same process too.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, _FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                pid = _read_pid(self.path)
                raise InputError(f"another preftune process{f' (pid {pid})' if pid else ''} is writing this folder",
                                 path=str(self.path.parent)) from None
            try:  # the holder before us may have removed the file after we opened it: lock the one in place
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                self.fd = fd
                return self
            os.close(fd)
        raise InputError("could not take the folder lock", path=str(self.path.parent))

    def __exit__(self, *exc: object) -> None:
        # a folder made read-only meanwhile: the file stays, the lock goes with the fd
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


class DamagedFile(InputError):
    """A file preftune wrote and reads back (a checkpoint, the reference cache, a summary) that fails its
    checksum or does not parse: it is never trusted."""


def _tensor_digest(tensors: dict[str, Any]) -> str:
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_tensors(path: str | os.PathLike, tensors: dict[str, Any]) -> None:
    """A safetensors file whose header carries the sha256 of its tensors, written atomically (temp, fsync,
    rename); :func:`read_tensors` checks it. Run: ``write_tensors("ref.safetensors", {"logps": t})``."""
    from safetensors.torch import save_file

    with _replacing(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"sha256": _tensor_digest(tensors)})


def read_tensors(path: str | os.PathLike) -> dict[str, Any]:
    """The tensors of a file :func:`write_tensors` wrote, verified: DamagedFile (one line naming the file) when it
    is truncated, garbled or its bytes do not match the checksum in its header."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            want = (f.metadata() or {}).get("sha256")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has no iterator)
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise DamagedFile(f"damaged: not a readable safetensors file ({one_line(e)})", path=str(path)) from None
    if want is None or want != _tensor_digest(tensors):
        raise DamagedFile("damaged: its tensors do not match the checksum written with them", path=str(path))
    return tensors


def json_digest(obj: Any) -> str:
    """sha256 of a JSON value in canonical form (sorted keys): the checksum a summary carries."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()


def clean_json(obj: Any) -> Any:
    """``obj`` with NaN/inf floats replaced by None, so the JSON written is strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    return obj


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
