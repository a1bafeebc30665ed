"""The run folder: lock, atomic writes, checkpoints and the metrics log.

Layout of a run folder::

    config.toml        the resolved config (every default filled in)
    run.json           method order, versions, seed, device; where the methods, dataset and model came from
    metrics.jsonl      one JSON object per epoch (and the final test line)
    checkpoints/last.pt   latest epoch;  checkpoints/best.pt  best validation top-1
    report.md, *.png   the report
    .lock              the pid of the process using the folder

Every file is written to a temporary file in the same folder, flushed, fsynced
and renamed over the old one, so a crash leaves either the old or the new file,
never half of one; the previous checkpoint stays in place until the new one is
complete.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import torch

from .errors import RunError

CHECKPOINT_FORMAT = 1
#: what every checkpoint holds (a file that loads but lacks one is refused, naming it)
CHECKPOINT_KEYS = ("epoch", "step", "model", "optimizer", "scheduler", "scaler", "sampler", "rng", "generators",
                   "methods", "method_order")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            kept = "the previous version is intact" if path.exists() else "no partial file was left"
            raise RunError(f"disk full while writing {path}; {kept}") from None
        raise RunError(f"cannot write {path}: {exc.strerror or exc}") from None
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunDir:
    """A run folder owned by this process while the run lasts."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.ckpt_dir = self.path / "checkpoints"
        self._locked = False

    # -- creation / locking ---------------------------------------------------------------

    def create(self, overwrite: bool = False) -> None:
        """Make a new run folder; an existing non-empty one needs ``overwrite``."""
        self.check_new(overwrite)
        if self._used():
            self.lock()  # refuse to clear a folder another live run is using
            for sub in ("checkpoints",):
                for f in (self.path / sub).glob("*") if (self.path / sub).is_dir() else []:
                    f.unlink()
            for name in ("metrics.jsonl", "config.toml", "run.json", "report.md"):
                (self.path / name).unlink(missing_ok=True)
            for f in self.path.glob("*.png"):
                f.unlink()
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock()
        self.ckpt_dir.mkdir(exist_ok=True)

    def _used(self) -> bool:
        """The folder holds something besides a lock file."""
        return self.path.is_dir() and any(p.name != ".lock" for p in self.path.iterdir())

    def check_new(self, overwrite: bool = False) -> None:
        """Refuse a path that is not a folder, or a used folder without ``overwrite``."""
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"{self.path} exists and is not a folder")
        if self._used() and not overwrite:
            raise RunError(
                f"run folder {self.path} already exists; use --resume {self.path} to continue it, "
                "--overwrite to replace it, or another --out"
            )

    def lock(self) -> None:
        if self._locked:
            return
        lock = self.path / ".lock"
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(lock.read_text().strip() or "0")
                except (OSError, ValueError):
                    pid = 0
                if pid != os.getpid() and _pid_alive(pid):
                    raise RunError(f"run folder {self.path} is in use by process {pid} (lock file {lock})") from None
                lock.unlink(missing_ok=True)  # stale lock of a dead process
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            self._locked = True
            return
        raise RunError(f"cannot take the lock {lock}")

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete temporary files left by a process killed while writing (never a real file)."""
        removed = []
        for folder in (self.path, self.ckpt_dir):
            for f in folder.glob(".*.tmp-*") if folder.is_dir() else []:
                f.unlink(missing_ok=True)
                removed.append(f)
        return removed

    def unlock(self) -> None:
        if self._locked:
            (self.path / ".lock").unlink(missing_ok=True)
            self._locked = False

    # -- files ------------------------------------------------------------------------------

    def write_text(self, name: str, text: str) -> None:
        atomic_write_text(self.path / name, text)

    def write_json(self, name: str, data) -> None:
        atomic_write_text(self.path / name, json.dumps(data, indent=2, sort_keys=True) + "\n")

    def append_metrics(self, record: dict) -> None:
        """Append one line to metrics.jsonl durably (rewritten atomically, so never torn)."""
        path = self.path / "metrics.jsonl"
        old = path.read_text() if path.exists() else ""
        atomic_write_text(path, old + json.dumps(record, sort_keys=True) + "\n")

    def read_metrics(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        out = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    raise RunError(f"{path} line {i} is not valid JSON") from None
        return out

    def truncate_metrics(self, last_epoch: int) -> None:
        """Drop metric lines after ``last_epoch`` (they are redone after a resume)."""
        kept = [r for r in self.read_metrics() if r.get("kind") == "epoch" and r.get("epoch", 0) <= last_epoch]
        atomic_write_text(self.path / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    def save_checkpoint(self, state: dict, name: str = "last.pt") -> Path:
        import io

        buf = io.BytesIO()
        torch.save(state, buf)
        path = self.ckpt_dir / name
        atomic_write_bytes(path, buf.getvalue())
        return path

    def checkpoint_path(self, name: str = "last.pt") -> Path:
        return self.ckpt_dir / name


def _load_failure(exc: Exception) -> str:
    """The line of torch.load's message that says what is wrong: a weights-only refusal opens
    with a generic paragraph (and advice to load unsafely) before naming the offending object."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Weights only load failed"):
        return f"{lines[1]} (a batchkin checkpoint holds only tensors and plain data)"
    return lines[0] if lines else ""


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True`` (no code runs from the file)."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise RunError(f"checkpoint {path} cannot be loaded: {type(exc).__name__}: {_load_failure(exc)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{path} is not a batchkin checkpoint (format {CHECKPOINT_FORMAT})")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise RunError(f"checkpoint {path} is incomplete: it lacks {', '.join(missing)}")
    return ckpt
