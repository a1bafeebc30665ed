"""Checkpoint selection (``train.best_metric``) and early stopping (``[train.early_stop]``).

Both watch a validation metric, named as in metrics.jsonl without the ``val/`` prefix:
the engine's ``top1``, ``balanced_acc``, ``many_acc``, ``medium_acc``, ``few_acc``, ``loss``
(the classifier's mean cross-entropy; absent where the run is evaluated by kNN), or one
an enabled method adds in ``on_evaluate`` and declares in its ``val_metrics``. A name
is checked when the run is prepared, before anything is written.

* ``best_metric = "auto"`` is ``balanced_acc`` when the training data is long-tailed
  (:func:`batchkin.metrics.is_long_tailed`: ``data.imbalance_factor > 1``, or the largest
  training class has at least three times the images of the smallest), else ``top1``.
  Higher is better, except for a name ending in ``loss``. ``best.pt`` is written at
  every evaluation that beats the best so far (strictly; a NaN never does); with an
  EMA the metric is the EMA weights'.
* Early stopping (``patience > 0``) follows Lightning's ``EarlyStopping``: an evaluation
  improves when it beats the best value seen by more than ``min_delta``; after
  ``patience`` evaluations in a row without improvement the run stops at the end of
  that epoch: last.pt is written, the final test evaluation and the report happen as
  at the end of a full run, and the final line of metrics.jsonl and run.json record
  the stop epoch. Its counters are saved in every checkpoint, so a resumed run stops
  where an uninterrupted one would; resuming a stopped run trains no further.
"""

from __future__ import annotations

import math

from .errors import ConfigError
from .metrics import is_long_tailed
from .schema import suggest

#: the validation metrics the engine computes (batchkin.metrics.classification_metrics)
ENGINE_VAL_METRICS = ("top1", "balanced_acc", "many_acc", "medium_acc", "few_acc")


def metric_mode(name: str, mode: str = "auto") -> str:
    """``"max"`` or ``"min"``: ``mode`` itself, or for ``"auto"`` min for a loss and max otherwise."""
    if mode != "auto":
        return mode
    return "min" if name.endswith("loss") else "max"


def _metric_name(key: str, value: str, known: list[str]) -> str:
    name = value[len("val/"):] if value.startswith("val/") else value
    if name not in known:
        raise ConfigError(f"{key} = {value!r} is not a validation metric of this run{suggest(name, known)}; "
                          f"one of {', '.join(known)} (a method's own metrics are those it declares in val_metrics)")
    return name


def _better(value, best, mode: str, delta: float = 0.0) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value > best + delta if mode == "max" else value < best - delta


class Selection:
    """The run's best-checkpoint choice and early-stop counters (checkpointed)."""

    def __init__(self, state):
        cfg = state.config
        from .report import run_evaluation

        known = list(ENGINE_VAL_METRICS) + (["loss"] if run_evaluation(state) == "classifier" else [])
        for method in state.hooks.methods.values():
            known.extend(m for m in getattr(method, "val_metrics", ()) if m not in known)
        if cfg.train.best_metric == "auto":
            long_tailed = is_long_tailed(state.splits.train_counts(), cfg.data.imbalance_factor)
            self.metric = "balanced_acc" if long_tailed else "top1"
            self.why = "auto: long-tailed training data" if long_tailed else "auto: balanced training data"
        else:
            self.metric = _metric_name("train.best_metric", cfg.train.best_metric, known)
            self.why = "train.best_metric"
        self.mode = metric_mode(self.metric)
        es = cfg.train.early_stop
        self.patience, self.min_delta = es.patience, es.min_delta
        self.stop_metric = self.metric if es.metric == "auto" else \
            _metric_name("train.early_stop.metric", es.metric, known)
        self.stop_mode = metric_mode(self.stop_metric, es.mode)
        if self.patience and not len(state.splits.val):
            raise ConfigError(f"train.early_stop.patience = {self.patience} needs a validation split; "
                              f"data.val_fraction is {cfg.data.val_fraction}")
        self.best = {"epoch": 0, self.metric: None}
        self.stop_best = None
        self.bad = 0  # evaluations in a row without improvement
        self.stopped = 0  # the epoch the run stopped at (0: it did not)

    def describe(self) -> dict:
        """What run.json records."""
        info = {"best_metric": {"metric": self.metric, "mode": self.mode, "chosen_by": self.why}}
        if self.patience:
            info["early_stop"] = {"metric": self.stop_metric, "mode": self.stop_mode, "patience": self.patience,
                                  "min_delta": self.min_delta}
        return info

    def update(self, epoch: int, metrics: dict) -> bool:
        """Record an evaluation's metrics; True when it is the new best (write best.pt)."""
        for name in {self.metric, self.stop_metric}:
            if name not in metrics:
                from .errors import RunError

                raise RunError(f"the validation metrics have no {name!r} (metrics: {', '.join(sorted(metrics))}); "
                               "a method that declares it in val_metrics must add it in on_evaluate")
        value = metrics[self.metric]
        improved = _better(value, self.best[self.metric], self.mode)
        if improved:
            self.best = {"epoch": epoch, self.metric: value}
        if self.patience:
            watched = metrics[self.stop_metric]
            if _better(watched, self.stop_best, self.stop_mode, self.min_delta):
                self.stop_best, self.bad = watched, 0
            else:
                self.bad += 1
            if self.bad >= self.patience:
                self.stopped = epoch
        return improved

    def state_dict(self) -> dict:
        return {"best": self.best, "early_stop": {"best": self.stop_best, "bad": self.bad, "stopped": self.stopped}}

    def load_state_dict(self, best: dict | None, early_stop: dict | None) -> None:
        if best and self.metric in best:
            self.best = {"epoch": int(best["epoch"]), self.metric: best[self.metric]}
            if best[self.metric] is not None and best["epoch"] == 0:
                self.best[self.metric] = None
        if early_stop:
            self.stop_best, self.bad = early_stop.get("best"), int(early_stop.get("bad", 0))
            self.stopped = int(early_stop.get("stopped", 0))
