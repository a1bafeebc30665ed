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
complete. A run that replaces another one is built next to it and swapped in
whole (see :class:`RunDir`). ``run.json`` is the marker of a batchkin run folder:
``--overwrite`` replaces only folders that carry it.

run.json also records the plugin files the run was trained with (absolute path and
sha256); :func:`plugin_files_for_run` finds them again for ``eval`` and ``--resume``.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from .errors import PluginError, RunError

CHECKPOINT_FORMAT = 1
MARKER = "run.json"  # what makes a folder a batchkin run (see is_run_folder)

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
    """A run folder owned by this process while the run lasts.

    ``final`` is the folder the run lives in; ``path`` is where its files are written
    now: ``final`` itself, except while a new run replaces an existing one. Such a
    run is built in a hidden sibling folder (``.<name>.batchkin-new-<pid>``, same
    parent, so the swap is one rename) and swapped in by :meth:`commit_replacement`
    when it has written its first ``checkpoints/last.pt``; until then ``final`` is
    untouched, and :meth:`discard_replacement` removes the sibling.

    On Linux the swap is atomic (``renameat2(RENAME_EXCHANGE)``), so a process killed
    at any point leaves ``final`` holding the old run or the new one. Elsewhere it is
    two renames (the old run moved to ``.<name>.batchkin-old-<pid>``, the new one moved
    in); :meth:`recover` completes a swap cut between them. Either way :meth:`recover`
    removes the siblings a killed process left behind.
    """

    def __init__(self, path: str | os.PathLike):
        self.final = Path(path)
        self.path = self.final
        self.staging: Path | None = None
        self.last_epoch: int | None = None  # epoch of the checkpoints/last.pt in ``final``
        self._locked = False

    @property
    def ckpt_dir(self) -> Path:
        return self.path / "checkpoints"

    # -- what the folder holds --------------------------------------------------------------

    def _used(self) -> bool:
        """The folder holds something besides what a new run creates before its run.json: the
        lock, an empty checkpoints/ folder, the temporary file of run.json itself."""
        if not self.final.is_dir():
            return False
        for p in self.final.iterdir():
            if p.name == ".lock" or _FIRST_WRITE.match(p.name):
                continue
            if p.name == "checkpoints" and p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
                continue
            return True
        return False

    def is_run(self) -> bool:
        return is_run_folder(self.final)

    def check_new(self, overwrite: bool = False) -> str:
        """How a new run may use the folder: ``"fresh"`` (absent or empty: the run is written
        there directly) or ``"replace"`` (a batchkin run, replaced with ``overwrite`` or when it
        never wrote ``checkpoints/last.pt``). Anything else is refused."""
        p = self.final
        if p.exists() and not p.is_dir():
            raise RunError(f"{p} exists and is not a folder")
        if not self._used():
            return "fresh"
        if not self.is_run():
            if overwrite:
                raise RunError(f"--overwrite replaces only batchkin run folders: {p} holds other files and no "
                               f"batchkin {MARKER}; remove them yourself or choose another --out")
            raise RunError(f"{p} already exists and is not a batchkin run folder (no {MARKER}); choose another --out")
        if overwrite or not (p / "checkpoints" / "last.pt").is_file():
            return "replace"
        raise RunError(
            f"run folder {p} already exists; use --resume {p} to continue it, "
            "--overwrite to replace it, or another --out"
        )

    # -- locking -----------------------------------------------------------------------------

    def lock(self) -> None:
        """Take ``final/.lock`` (a lock left by a dead process is taken over)."""
        if self._locked:
            return
        lock = self.final / ".lock"
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(lock.read_text().strip() or "0")
                except (OSError, ValueError):
                    pid = 0
                if pid != os.getpid() and _pid_alive(pid):
                    raise RunError(f"run folder {self.final} is in use by process {pid} (lock file {lock})") from None
                lock.unlink(missing_ok=True)  # stale lock of a dead process
                continue
            except OSError as exc:
                raise RunError(f"cannot take the lock {lock}: {exc.strerror or exc}") from None
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            self._locked = True
            return
        raise RunError(f"cannot take the lock {lock}")

    def unlock(self) -> None:
        if self._locked:
            (self.final / ".lock").unlink(missing_ok=True)
            self._locked = False

    # -- creating, replacing, recovering ---------------------------------------------------

    def create(self) -> None:
        """Start a new run in an absent or empty folder (``check_new`` said ``"fresh"``)."""
        try:
            self.final.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunError(f"cannot create the run folder {self.final}: {exc.strerror or exc}") from None
        self.lock()
        if self._used():  # another command wrote there since check_new
            self.check_new()
        self.remove_stale_temp_files()  # a run killed inside its first write
        self.ckpt_dir.mkdir(exist_ok=True)

    def _sibling(self, kind: str, pid: int | None = None) -> Path:
        return self.final.parent / f".{self.final.name}.batchkin-{kind}-{os.getpid() if pid is None else pid}"

    def begin_replacement(self) -> None:
        """Write the new run into a hidden sibling folder until :meth:`commit_replacement`
        (the caller holds the lock of ``final``)."""
        staging = self._sibling("new")
        _remove_tree(staging)  # left by an earlier run of this same process
        try:
            (staging / "checkpoints").mkdir(parents=True)
            (staging / ".lock").write_text(str(os.getpid()))  # ``final``'s lock once swapped in
        except OSError as exc:
            _remove_tree(staging)
            raise RunError(f"cannot create {staging} for the new run: {exc.strerror or exc}") from None
        self.staging = self.path = staging

    def commit_replacement(self) -> None:
        """Swap the new run in for the old one, then delete the old one."""
        staging = self.staging
        try:
            if _exchange(staging, self.final):
                old = staging  # now holds the old run
            else:
                old = self._sibling("old")
                os.rename(self.final, old)
                try:
                    os.rename(staging, self.final)
                except OSError:
                    os.rename(old, self.final)
                    raise
        except OSError as exc:
            raise RunError(f"cannot move the new run from {staging} to {self.final}: {exc.strerror or exc}") from None
        _fsync_dir(self.final.parent)
        self.path, self.staging = self.final, None
        _remove_tree(old)

    def discard_replacement(self) -> None:
        """Delete an uncommitted replacement; ``final`` was never touched."""
        if self.staging is not None:
            staging, self.path, self.staging = self.staging, self.final, None
            _remove_tree(staging)

    def recover(self) -> list[str]:
        """Finish what a killed process left next to the folder; returns what was done.

        Siblings of dead processes are deleted, except that when ``final`` is missing (a
        two-rename swap cut in the middle) a committed new run (it has ``last.pt``) is
        moved in, else the old run moved aside is moved back. Siblings of live processes
        are left alone (their owner holds the folder's lock).
        """
        parent, notes, found = self.final.parent, [], []
        try:
            entries = list(parent.iterdir())
        except OSError:  # no parent yet, or one this process cannot read: nothing to recover
            return notes
        for p in entries:
            m = _SIBLING.match(p.name)
            if not m or m["name"] != self.final.name or not p.is_dir():
                continue
            pid = int(m["pid"])
            if pid != os.getpid() and _pid_alive(pid):
                continue
            found.append((m["kind"], p))
        if not self.final.exists():
            new = [p for kind, p in found if kind == "new" and (p / "checkpoints" / "last.pt").is_file()]
            old = [p for kind, p in found if kind == "old"]
            pick = (new or old or [None])[0]
            if pick is not None:
                try:
                    os.rename(pick, self.final)
                except OSError as exc:
                    raise RunError(f"cannot move {pick} back to {self.final}: {exc.strerror or exc}") from None
                _fsync_dir(parent)
                what = "the new run" if pick in new else "the previous run"
                notes.append(f"moved {what} from {pick} to {self.final} (a killed process left it there)")
                found = [(k, p) for k, p in found if p != pick]
        for _, p in found:
            _remove_tree(p)
            notes.append(f"removed {p}, left by a killed process")
        return notes

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete temporary files left by a process killed while writing (never a real file)."""
        removed = []
        for folder in (self.path, self.ckpt_dir):
            for f in folder.glob(".*.tmp-*") if folder.is_dir() else []:
                f.unlink(missing_ok=True)
                removed.append(f)
        return removed

    # -- files ------------------------------------------------------------------------------

    def write_text(self, name: str, text: str) -> None:
        atomic_write_text(self.path / name, text)

    def write_json(self, name: str, data) -> None:
        atomic_write_text(self.path / name, json.dumps(data, indent=2, sort_keys=True) + "\n")

    def read_json(self, name: str) -> dict:
        """A JSON object of the folder ({} when the file is missing or not a JSON object)."""
        try:
            data = json.loads((self.path / name).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

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


_SIBLING = re.compile(r"^\.(?P<name>.+)\.batchkin-(?P<kind>new|old)-(?P<pid>\d+)$")
_FIRST_WRITE = re.compile(rf"^\.{re.escape(MARKER)}\.tmp-\d+$")  # see atomic_write_bytes


def is_run_folder(path: str | os.PathLike) -> bool:
    """The folder carries batchkin's run marker: a run.json object naming the batchkin version."""
    try:
        info = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and "batchkin" in info


def _remove_tree(path: Path) -> None:
    if path.is_symlink():  # a run folder given as a link: the link goes, never its target
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step; False where the system or file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))

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


# ------------------------------------------------------------------------------ plugin files of a run


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def plugin_file_records(origins) -> list[dict]:
    """run.json's ``plugin_files``: absolute path and sha256 of every plugin loaded from a file
    (``origins`` are the plugins' origin strings, ``"file <path>"`` for those)."""
    out = []
    for origin in origins:
        if origin.startswith("file "):
            path = Path(origin[len("file "):]).absolute()
            out.append({"path": str(path), "sha256": file_sha256(path) if path.is_file() else ""})
    return sorted(out, key=lambda r: r["path"])


def plugin_files_for_run(run: str | os.PathLike, given, allow_changed: bool = False) -> list[str]:
    """The plugin files a run was trained with that ``given`` (the files loaded anyway:
    ``--plugin`` and ``$BATCHKIN_PLUGINS``) does not already provide, to be loaded too.

    A recorded file is provided by a given file of the same name (plugins are named by
    their file's stem), else it is loaded from its recorded path. Its content must be
    the one recorded (sha256): a missing file, or a changed one without
    ``allow_changed``, is refused with a line naming it.
    """
    run = Path(run)
    info = RunDir(run).read_json(MARKER)
    records = info.get("plugin_files") or []
    given = {Path(g).stem: Path(g) for g in given}
    extra = []
    for rec in records:
        if not isinstance(rec, dict) or not isinstance(rec.get("path"), str):
            continue
        recorded, want = Path(rec["path"]), rec.get("sha256", "")
        path = given.get(recorded.stem, recorded)
        if not path.is_file():
            if path != recorded:
                continue  # the loader reports a given file that is missing
            raise PluginError(
                f"{run} was trained with the plugin file {recorded}, which is missing; restore it or "
                f"give its copy with --plugin FILE"
            )
        have = file_sha256(path)
        if have != want and not allow_changed:
            what = f"{path} differs from the plugin file {recorded} that {run} was trained with" \
                if path != recorded else f"the plugin file {recorded} changed since {run} was trained with it"
            raise PluginError(
                f"{what} (sha256 {want[:12]}, now {have[:12]}); give the original with --plugin FILE, "
                f"or add --allow-changed-plugins to use it as it is"
            )
        if path == recorded and recorded.stem not in given:
            extra.append(str(recorded))
    return extra
