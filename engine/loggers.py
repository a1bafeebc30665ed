"""The run's loggers: metrics.jsonl and steps.jsonl always, TensorBoard and CSV on request.

``[log] backends`` (:class:`batchkin.config.LogConfig`) picks them; rank 0 alone writes.
Two kinds of rows reach every backend:

* **epoch rows**: the lines of metrics.jsonl, one per epoch (``kind = "epoch"``: the
  epoch's mean loss and loss terms, the learning rate of every parameter group, the
  methods' epoch scalars, validation metrics, images/s) and the final test line
  (``kind = "final"``);
* **step rows**: every ``train.log_every`` optimizer steps (``state.step`` a multiple of
  it): the step's loss and loss terms (means over its micro-batches), the learning rate
  each group used, the methods' step scalars (``state.step_metrics``) and the EMA decay.

Files in the run folder:

================  ============================================================
metrics.jsonl     epoch rows (always; the reports and ``--resume`` read it)
steps.jsonl       step rows (always)
tensorboard/      ``events.out.tfevents.*``: epoch rows under their own names
                  (``loss``, ``val/top1``, ``bbn/alpha``, ...), step rows under
                  ``step/<name>``; every row at ``global_step = state.step``
metrics.csv       epoch rows and the final line, one column per value (lists
                  such as per-class accuracies stay in metrics.jsonl)
steps.csv         step rows
================  ============================================================

The two jsonl files are the record; the other backends are derived from them. On
``--resume``, when the resumed run commits its first row, metrics.jsonl is cut back
to the checkpoint's epoch (:meth:`batchkin.rundir.RunDir.truncate_metrics`),
steps.jsonl to the checkpoint's step, and the TensorBoard and CSV files are written
again from the two jsonl files: no row is lost or repeated, whatever a killed run left
behind, and a backend added on resume (``log.backends`` may change) holds the whole
run. Until that commit the resumed run's step rows are held back, so a resume that
fails early leaves every file as it was.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from .errors import ConfigError
from .rundir import RunDir, atomic_write_text

STEPS_FILE = "steps.jsonl"
TENSORBOARD_DIR = "tensorboard"
CSV_FILES = {"epoch": "metrics.csv", "step": "steps.csv"}


def check_backends(backends) -> None:
    """Refuse a backend whose package is missing, before anything is written."""
    if "tensorboard" in backends:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise ConfigError("log.backends lists 'tensorboard' but the tensorboard package is not installed; "
                              "pip install 'batchkin[tensorboard]' (or remove it from log.backends)") from None


def _scalar(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(value) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a jsonl file written by this module; a line torn by a killed process is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


class TensorBoardBackend:
    """One SummaryWriter over ``tensorboard/``; opened at the first row."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.writer = None

    def _open(self):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.folder), flush_secs=30)
        return self.writer

    def write(self, kind: str, row: dict) -> None:
        w = self._open()
        step = int(row.get("step", 0))
        prefix = "step/" if kind == "step" else ""
        for key, value in row.items():
            # the epoch is a scalar of the epoch rows only (a step row and the final line carry it too)
            if key in ("kind", "step") or not _scalar(value) or (key == "epoch" and row.get("kind") != "epoch"):
                continue
            w.add_scalar(prefix + key, value, global_step=step)

    def reset(self) -> None:
        self.close()
        if self.folder.is_dir():
            for f in self.folder.glob("events.out.tfevents.*"):
                f.unlink()

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class CSVBackend:
    """metrics.csv and steps.csv: a header of every scalar seen so far; a row with a new
    column rewrites its file (atomically) with the wider header, any other row is appended."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.headers: dict[str, list[str]] = {}

    def _path(self, kind: str) -> Path:
        return self.folder / CSV_FILES[kind]

    def write(self, kind: str, row: dict) -> None:
        row = {k: v for k, v in row.items() if _cell(v)}
        path = self._path(kind)
        header = self.headers.get(kind)
        if header is None or not path.is_file():
            header = self.headers[kind] = []
        new = [k for k in row if k not in header]
        if new or not path.is_file():
            rows = self._read(kind) if path.is_file() else []
            header.extend(new)
            self._rewrite(kind, rows + [row])
        else:
            with open(path, "a", newline="") as fh:
                csv.DictWriter(fh, header, restval="").writerow(self._cells(row))

    @staticmethod
    def _cells(row: dict) -> dict:
        def text(v):
            if v is None:
                return ""
            if isinstance(v, float) and not math.isfinite(v):
                return "nan" if v != v else ("inf" if v > 0 else "-inf")
            return v

        return {k: text(v) for k, v in row.items()}

    def _read(self, kind: str) -> list[dict]:
        with open(self._path(kind), newline="") as fh:
            return list(csv.DictReader(fh))

    def _rewrite(self, kind: str, rows: list[dict]) -> None:
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, self.headers[kind], restval="")
        w.writeheader()
        for r in rows:
            w.writerow(self._cells(r))
        atomic_write_text(self._path(kind), buf.getvalue())

    def rebuild(self, kind: str, rows: list[dict]) -> None:
        rows = [{k: v for k, v in r.items() if _cell(v)} for r in rows]
        header: list[str] = []
        for r in rows:
            header.extend(k for k in r if k not in header)
        self.headers[kind] = header
        if rows:
            self._rewrite(kind, rows)
        else:
            self._path(kind).unlink(missing_ok=True)

    def reset(self) -> None:
        self.headers = {}

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class RunLog:
    """The loggers of a run (rank 0): ``epoch(row)``, ``step(row)``, ``resume(...)``, ``close()``.

    ``pending`` is true for a resume that has not committed yet: step rows wait until
    :meth:`resume` (see the module docstring).
    """

    def __init__(self, run: RunDir, backends, *, pending: bool = False):
        self.run = run
        self.names = [b for b in backends if b != "jsonl"]
        self.backends = []
        self.pending = pending
        self.held: list[dict] = []

    def _open(self):
        if not self.backends and self.names:
            made = {"tensorboard": lambda: TensorBoardBackend(self.run.path / TENSORBOARD_DIR),
                    "csv": lambda: CSVBackend(self.run.path)}
            self.backends = [made[n]() for n in self.names]
        return self.backends

    def epoch(self, row: dict) -> None:
        """An epoch row or the final line: metrics.jsonl, then every backend."""
        self.run.append_metrics(row)
        for b in self._open():
            b.write("epoch", row)
            b.flush()

    def step(self, row: dict) -> None:
        if self.pending:
            self.held.append(row)
            return
        self._step(row)

    def _step(self, row: dict) -> None:
        with open(self.run.path / STEPS_FILE, "a") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
        for b in self._open():
            b.write("step", row)

    def resume(self, step: int) -> None:
        """At the resumed run's first commit (metrics.jsonl already cut back): cut steps.jsonl
        back to ``step``, write the derived backends again from the jsonl files, then the held rows."""
        steps = [r for r in read_jsonl(self.run.path / STEPS_FILE) if int(r.get("step", 0)) <= step]
        atomic_write_text(self.run.path / STEPS_FILE, "".join(json.dumps(r, sort_keys=True) + "\n" for r in steps))
        epochs = self.run.read_metrics()
        for b in self._open():
            b.reset()
            if isinstance(b, CSVBackend):
                b.rebuild("epoch", epochs)
                b.rebuild("step", steps)
            else:
                for r in epochs:
                    b.write("epoch", r)
                for r in steps:
                    b.write("step", r)
            b.flush()
        self.pending = False
        held, self.held = self.held, []
        for row in held:
            self._step(row)

    def close(self) -> None:
        for b in self.backends:
            b.close()


class NoLog:
    """The loggers of a rank that does not write (ranks > 0)."""

    pending = False

    def epoch(self, row: dict) -> None:
        pass

    def step(self, row: dict) -> None:
        pass

    def resume(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass
