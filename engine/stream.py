"""Streamed datasets: images stay on disk; DataLoader workers decode and augment each batch.

Storage (``data.storage``): ``memory`` decodes the whole dataset once into a uint8
tensor on the training device (the fast path for small sets: digits, Fashion-MNIST,
CIFAR, small image folders; augmentation is the batched pad-crop + flip of
:mod:`batchkin.data`). ``stream`` keeps only the file list in memory and decodes each
step's images in ``data.num_workers`` DataLoader worker processes, with the ImageNet
transforms of :mod:`batchkin.transforms`. The default, ``auto``, keeps an image folder
in memory when its decoded size (every file at ``data.image_size``, or at the first
image's size) fits ``data.memory_budget_mb`` and streams it otherwise: small sets keep
the fast path and their CIFAR-style recipe, a collection that would not fit the
training device does not fail. The list-file formats always stream.

Formats (each a root folder, ``data.root``, plus lists relative to it):

* ``imagefolder`` with ``data.storage = "stream"`` (or ``auto`` over the budget): one
  subfolder per class, with ``train/`` and ``test/`` subfolders as the splits when both
  exist (:func:`streamed_image_folder`);
* ``imagelist``: list files of ``relative/path.jpg label`` lines (ImageNet-LT, Places-LT;
  ``data.train_list``, ``data.val_list``, ``data.test_list``; blank lines and ``#``
  comments are skipped; labels are integers, the class names ``"0" .. "K-1"``);
* ``inaturalist``: the iNaturalist 2017/2018 COCO-style JSON files (``images`` with
  ``file_name``, ``annotations`` with ``image_id`` and ``category_id``, ``categories``
  with ``id`` and ``name``; ``data.train_json``, ``data.val_json``, ``data.test_json``).
  Category ids are mapped to labels ``0 .. K-1`` in increasing id order; the class names
  are the categories' names.

A dataset's labels come from its lists without decoding any image, so the long-tailed,
few-shot and sized subsets and the held-out validation split are drawn by
:func:`batchkin.data.make_splits` exactly as for a dataset in memory with the same
labels. A shipped validation list is the validation split (``data.val_fraction`` then
holds nothing out); without a test list the test split is held out as for any dataset
without one. Every listed file is checked to exist before training starts (the first
few missing ones are named). The image size, when ``data.image_size`` is empty, and
the channels (1 when every sampled image is grayscale, else RGB) are read from the
headers of up to 16 training files; the normalisation mean and std are estimated from
up to 256 training images through the evaluation transform (a seeded sample).

The training loop (:meth:`StreamData.steps`): the run's sampler (the engine's shuffle,
BBN's two streams, any plugin's) is iterated by the trainer as for a dataset in
memory; a deep copy of it, started from the same state, feeds a DataLoader that runs
``num_workers * prefetch_factor`` steps ahead. One DataLoader item is one step: the
step's dict of index streams in, the dict of decoded uint8 batches out. The trainer's
sampler therefore always holds the position of the last step trained, so a checkpoint
resumes exactly where training stopped; each delivered step is checked to carry the
indices the trainer's sampler drew (a sampler whose copy draws differently is refused).

Augmentation randomness: sample ``k`` of stream ``s`` at the run's optimizer step ``t``
reads the uniforms ``batchkin.kernels.rng.uniform(derive_key(seed, t, s), slot * 64 + j)``
with ``slot = rank * batch_size + k`` (its position in the global batch). It depends on
no worker, no worker count and no process count (two ranks with batch b draw what one
rank with batch 2b draws), a resumed run redraws exactly, and a sample drawn twice in an
epoch (BBN's reversed stream samples with replacement) gets two different crops.

Methods that build their own views (``raw_batch = True`` on the method, as the SSL
bases) get the ``raw`` transform instead: the whole centred image at
``data.image_size``, as uint8. Their step's images are on the device as
``state.train_data.x[state.batch["idx"]]`` (``x`` indexes the current step's images
only; ``batch["x"]`` is then the normalised raw image).

Bad files: an unreadable or corrupt image stops the run with one line naming the file
(raised in a worker, reported by the training process). With ``data.skip_bad = true``
it is replaced by the next readable image of its class (in the split's order; same
label, same random numbers, so batch shapes and class balance hold), each bad file is
logged once on stderr and the epoch's count of replaced samples is recorded as
``data/skipped_images`` in the epoch's metrics.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import DeviceData, ImageDataset, list_image_folder
from .errors import ConfigError, DataError, RunError
from .transforms import UNIFORMS_PER_SAMPLE, ImageTransform, channels_of, open_image

#: Stream id folded into the run's seed for the per-sample augmentation uniforms.
AUGMENT_STREAM = 0x53545245
#: Offsets reserved per sample (UNIFORMS_PER_SAMPLE of them are read).
OFFSETS_PER_SAMPLE = 64
#: Training files whose headers give the image size and channels.
HEADER_SAMPLE = 16
#: Training images decoded to estimate the normalisation mean and std.
STATS_SAMPLE = 256
#: Missing files named in the error.
MISSING_SHOWN = 5
#: Files stat-ed per thread task when checking that a list's files exist.
STAT_CHUNK = 4096


# ------------------------------------------------------------------------------ the image source


class PathTable:
    """File names relative to ``root``, packed into one byte buffer and an offset array.

    No Python object per file: forked DataLoader workers read the same memory pages
    instead of copying them as reference counts change (a list of 400k strings would be
    copied into every worker over an epoch).
    """

    def __init__(self, root: str | Path, names: list[str]):
        encoded = [n.encode() for n in names]
        self.root = str(root)
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self.offsets[1:])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def name(self, row: int) -> str:
        return self.blob[self.offsets[row] : self.offsets[row + 1]].tobytes().decode()

    def path(self, row: int) -> str:
        return os.path.join(self.root, self.name(row))


@dataclass(frozen=True)
class StreamOptions:
    """How a streamed dataset's images are decoded and loaded (from ``[data]`` and the headers)."""

    mode: str  # Pillow mode of the decoded images: "L" or "RGB"
    size: tuple[int, int]  # (H, W) of every delivered image
    resize: int  # the evaluation transform's shorter side
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    num_workers: int = 0
    prefetch_factor: int = 2
    persistent_workers: bool = True
    pin_memory: bool = True
    skip_bad: bool = False

    def transform(self, kind: str, hflip: bool = True) -> ImageTransform:
        return ImageTransform(kind, self.mode, self.size, self.resize, self.scale, self.ratio, hflip)


class ImageFiles:
    """Images on disk, indexable like a uint8 tensor ``[N, C, H, W]``.

    Row ``i`` is the file ``table.path(rows[i])``; indexing with an index tensor or array
    gives the subset (how :func:`batchkin.data.make_splits` splits it); ``shape`` is that
    of the decoded images. ``stats`` estimates the normalisation from a seeded sample.
    """

    def __init__(self, table: PathTable, rows: np.ndarray, options: StreamOptions):
        self.table, self.rows, self.options = table, np.asarray(rows, dtype=np.int64), options

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.rows), channels_of(self.options.mode), *self.options.size)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index) -> ImageFiles:
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        return ImageFiles(self.table, self.rows[index], self.options)

    def path(self, i: int) -> str:
        return self.table.path(int(self.rows[i]))

    def stats(self, seed: int) -> tuple[list[float], list[float]]:
        """Per-channel mean and std (at least 1e-3) of up to ``STATS_SAMPLE`` images chosen with
        ``seed``, through the evaluation transform (decoded here, in this process)."""
        gen = torch.Generator().manual_seed(seed)
        sample = torch.randperm(len(self), generator=gen)[:STATS_SAMPLE].sort().values.tolist()
        transform = self.options.transform("eval")
        arrays = []
        for i in sample:
            try:
                arrays.append(transform(open_image(self.path(i))))
            except _BAD_IMAGE as exc:
                if not self.options.skip_bad:
                    raise DataError(unreadable(self.path(i), exc)) from None
        if not arrays:
            raise DataError(f"none of the {len(sample)} sampled training images under {self.table.root} is readable")
        x = torch.from_numpy(np.stack(arrays)).float() / 255.0  # [n, H, W, C]
        return x.mean(dim=(0, 1, 2)).tolist(), x.std(dim=(0, 1, 2)).clamp_min(1e-3).tolist()


def _bad_image_errors() -> tuple:
    from PIL import Image, UnidentifiedImageError

    return (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError)


_BAD_IMAGE = _bad_image_errors()


def unreadable(path: str, exc: BaseException) -> str:
    return f"{path} is not a readable image: {type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------ the worker side


@dataclass
class Request:
    """One DataLoader item's order: decode ``streams`` (name -> dataset indices) with the
    ``kind`` transform; ``step`` and ``base_slot`` key the training transform's randomness."""

    kind: str
    streams: dict
    seed: int = 0
    step: int = 0
    base_slot: int = 0
    hflip: bool = True


@dataclass
class Loaded:
    """What a worker returns for a :class:`Request`: uint8 images ``[B, H, W, C]`` and the
    indices per stream, the files replaced (``skip_bad``) and the first unreadable file."""

    images: dict = field(default_factory=dict)
    indices: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)  # (bad path, reason, replacement path)
    error: str | None = None

    def pin_memory(self) -> Loaded:
        """Page-lock the images (the DataLoader's pinning thread calls this with ``pin_memory``)."""
        self.images = {k: v.pin_memory() for k, v in self.images.items()}
        return self


def augment_uniforms(seed: int, step: int, stream: str, slots: torch.Tensor) -> np.ndarray:
    """The training transform's uniforms ``[len(slots), UNIFORMS_PER_SAMPLE]`` of stream
    ``stream`` at run step ``step`` (see the module docstring)."""
    from batchkin.kernels.rng import derive_key, uniform

    name = stream.encode()
    key = derive_key(seed, AUGMENT_STREAM, step, len(name), *name)
    offsets = slots.to(torch.int64)[:, None] * OFFSETS_PER_SAMPLE + torch.arange(UNIFORMS_PER_SAMPLE)
    return uniform(key, offsets).numpy()


class StreamDataset(torch.utils.data.Dataset):
    """The map-style dataset the DataLoader workers index with :class:`Request` items."""

    def __init__(self, files: ImageFiles, labels: torch.Tensor):
        self.files = files
        self.labels = labels.cpu().numpy()
        self._members: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, request: Request) -> Loaded:
        out = Loaded()
        transform = self.files.options.transform(request.kind, request.hflip)
        c = channels_of(transform.mode)
        h, w = transform.size
        for stream, idx in request.streams.items():
            idx = torch.as_tensor(idx, dtype=torch.int64)
            images = _batch_buffer((len(idx), h, w, c))
            buf = images.numpy()
            u = None
            if transform.random:
                slots = request.base_slot + torch.arange(len(idx))
                u = augment_uniforms(request.seed, request.step, stream, slots)
            for k, i in enumerate(idx.tolist()):
                try:
                    buf[k] = transform(open_image(self.files.path(i)), None if u is None else u[k])
                except _BAD_IMAGE as exc:
                    if not self.files.options.skip_bad:
                        out.error = unreadable(self.files.path(i), exc)
                        return out
                    arr = self._replacement(i, transform, None if u is None else u[k], exc, out)
                    if arr is None:
                        return out
                    buf[k] = arr
            out.images[stream], out.indices[stream] = images, idx
        return out

    def _replacement(self, i: int, transform, u, exc, out: Loaded) -> np.ndarray | None:
        """The next readable image of sample ``i``'s class after ``i`` (cyclically), transformed
        with ``i``'s random numbers; the swap is recorded in ``out.skipped`` (None and
        ``out.error`` set when no image of the class is readable)."""
        c = int(self.labels[i])
        if c not in self._members:
            self._members[c] = np.flatnonzero(self.labels == c)
        members = self._members[c]
        start = int(np.searchsorted(members, i)) + 1
        for j in np.roll(members, -start)[: len(members) - 1].tolist():
            try:
                arr = transform(open_image(self.files.path(j)), u)
            except _BAD_IMAGE:
                continue
            out.skipped.append((self.files.path(i), f"{type(exc).__name__}: {exc}", self.files.path(j)))
            return arr
        out.error = (f"{unreadable(self.files.path(i), exc)}; data.skip_bad found no readable image of its "
                     f"class {c} to use instead")
        return None


def _batch_buffer(shape: tuple) -> torch.Tensor:
    """An uninitialised uint8 tensor; in a worker process, in shared memory from the start (as
    the default collate allocates its batches), so sending it to the training process copies
    nothing."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape)


def _identity(item):
    return item


class _StepRequests:
    """The training DataLoader's sampler: a copy of the run's sampler, iterated ahead of the
    trainer, turned into one :class:`Request` per step (set anew every epoch)."""

    def __init__(self):
        self.sampler, self.kind, self.seed, self.first_step, self.base_slot, self.hflip = None, "train", 0, 0, 0, True

    def __iter__(self):
        for step, streams in enumerate(self.sampler, self.first_step):
            streams = {k: torch.as_tensor(v).cpu() for k, v in streams.items()}
            yield Request(self.kind, streams, self.seed, step, self.base_slot, self.hflip)


def wants_raw_batch(state) -> bool:
    """Whether an enabled method builds its own views from raw images (``raw_batch = True``)."""
    return any(getattr(m, "raw_batch", False) for m in state.hooks.methods.values())


# ------------------------------------------------------------------------------ the training side


class _StepImages:
    """``StreamData.x``: the current step's raw uint8 images ``[B, C, H, W]`` on the device,
    indexed by the step's dataset indices (``x[batch["idx"]]``)."""

    def __init__(self, data: StreamData):
        self._data = data

    @property
    def device(self) -> torch.device:
        return self._data.device

    def __getitem__(self, idx) -> torch.Tensor:
        data = self._data
        if not data.raw_mode:
            raise RunError("streamed training batches hold augmented images only; a method that reads the raw "
                           "images (state.train_data.x[idx]) must declare raw_batch = True")
        return data._device_images(data._stream_of(idx))


class StreamData(DeviceData):
    """A streamed split: labels on the device, images decoded per batch by worker processes.

    The interface of :class:`batchkin.data.DeviceData` (``DeviceData(split, ...)`` of a
    streamed split builds one): ``len``, ``y``, ``mean``, ``std``, ``normalize``,
    ``eval_batches``, plus :meth:`steps`, which the trainer iterates instead of the
    sampler, ``batch`` (the current step's images of one stream, normalised on the
    device) and ``x`` (the current step's raw images, for ``raw_batch`` methods).
    """

    def __init__(self, split, splits, device: torch.device):
        self.files: ImageFiles = split.x
        self.options = self.files.options
        self.device = torch.device(device)
        self.y = split.y.to(self.device)
        c = self.files.shape[1]
        self.mean = torch.tensor(splits.mean, device=self.device).view(1, c, 1, 1)
        self.std = torch.tensor(splits.std, device=self.device).view(1, c, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * self.std), -self.mean / self.std
        self.dataset = StreamDataset(self.files, split.y)
        self.raw_mode = False
        self.skipped = 0  # replaced samples (data.skip_bad) since the last epoch's report
        self._requests = _StepRequests()
        self._loader = None
        self._current: tuple[dict, Loaded, dict] | None = None
        self._logged: set[str] = set()

    def __len__(self) -> int:
        return len(self.files)

    @property
    def x(self) -> _StepImages:
        return _StepImages(self)

    def _dataloader(self, requests, persistent: bool):
        o = self.options
        workers = o.num_workers
        return torch.utils.data.DataLoader(
            self.dataset, sampler=requests, batch_size=None, collate_fn=_identity, num_workers=workers,
            pin_memory=o.pin_memory and self.device.type == "cuda",
            prefetch_factor=o.prefetch_factor if workers else None,
            persistent_workers=persistent and workers > 0,
            # the DataLoader draws its workers' base seed from this generator, not the global RNG
            generator=torch.Generator().manual_seed(0),
        )

    def _receive(self, loaded: Loaded) -> Loaded:
        if loaded.error is not None:
            raise DataError(loaded.error)
        for bad, reason, used in loaded.skipped:
            self.skipped += 1
            if bad not in self._logged:
                self._logged.add(bad)
                print(f"batchkin: skipping unreadable image {bad} ({reason}); using {used} instead",
                      file=sys.stderr, flush=True)
        return loaded

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, H, W, C]`` (pinned on CUDA) to contiguous uint8 ``[B, C, H, W]`` on the device
        (transposed as bytes: a quarter of the traffic of transposing the normalised floats)."""
        return images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()

    def normalize(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """``(x / 255 - mean) / std`` as one multiply and one add in place (equal up to float rounding)."""
        return x_uint8.float().mul_(self._scale).add_(self._shift)

    def steps(self, state):
        """The run's sampler, one step's index dict at a time, with the step's images loaded
        ahead by the DataLoader (see the module docstring)."""
        cfg = state.config
        self.raw_mode = wants_raw_batch(state)
        r = self._requests
        r.sampler = copy.deepcopy(state.sampler)
        r.kind = "raw" if self.raw_mode else ("train" if cfg.data.augment else "eval")
        r.seed, r.first_step, r.hflip = cfg.seed, state.step, state.splits.hflip
        r.base_slot = state.rank * cfg.data.batch_size
        if self._loader is None:
            self._loader = self._dataloader(r, self.options.persistent_workers)
        loaded_steps = iter(self._loader)
        self.skipped = 0
        for indices in state.sampler:
            loaded = next(loaded_steps, None)
            if loaded is not None:
                self._receive(loaded)  # an unreadable file stops here
            if loaded is None or loaded.indices.keys() != indices.keys() or not all(
                    torch.equal(loaded.indices[k], torch.as_tensor(v).cpu()) for k, v in indices.items()):
                raise RunError("the sampler drew other indices from a copy of its own state; streamed data needs a "
                               "sampler whose iteration depends only on its state_dict (as resuming does)")
            self._current = (indices, loaded, {})
            yield indices
        self._current = None
        if self.options.skip_bad:
            state.epoch_metrics["data/skipped_images"] = self.skipped

    def _stream_of(self, idx) -> str:
        if self._current is None:
            raise RunError("streamed training batches are loaded by StreamData.steps(state): iterate "
                           "state.train_data.steps(state) instead of state.sampler")
        indices = self._current[0]
        for name, v in indices.items():
            if v is idx:
                return name
        for name, v in indices.items():
            if torch.equal(torch.as_tensor(v).cpu(), torch.as_tensor(idx).cpu()):
                return name
        raise RunError("the indices asked for are not one of the current step's streams")

    def _device_images(self, stream: str) -> torch.Tensor:
        _, loaded, on_device = self._current
        if stream not in on_device:
            on_device[stream] = self._to_device(loaded.images[stream])
        return on_device[stream]

    def batch(self, idx, *, augment: bool, padding: int, hflip: bool, gen, shard=(0, 1)):
        """The current step's stream ``idx``: normalised images (augmented by the workers; the
        arguments of the in-memory augmentation are not used) and labels, on the device."""
        x = self._device_images(self._stream_of(idx))
        return self.normalize(x), self.y[torch.as_tensor(idx).to(self.device)]

    def eval_batches(self, batch_size: int, rank: int = 0, world: int = 1):
        """Evaluation batches (resize + centre crop) of an interleaved shard, decoded by the workers."""
        idx = torch.arange(rank, len(self), world)
        requests = [Request("eval", {"": idx[s : s + batch_size]}) for s in range(0, len(idx), batch_size)]
        for loaded in self._dataloader(requests, persistent=False):
            self._receive(loaded)
            sel = loaded.indices[""].to(self.device)
            yield self.normalize(self._to_device(loaded.images[""])), self.y[sel]

    def close(self) -> None:
        """Stop the persistent training workers (they also stop with this object or the process)."""
        loader, self._loader = self._loader, None
        it = getattr(loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


# ------------------------------------------------------------------------------ building a streamed dataset


def stream_options(cfg, mode: str, size: tuple[int, int]) -> StreamOptions:
    resize = cfg.resize_size or int(max(size) / cfg.crop_fraction)
    return StreamOptions(
        mode=mode, size=tuple(size), resize=resize, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio),
        num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor,
        persistent_workers=cfg.persistent_workers, pin_memory=cfg.pin_memory, skip_bad=cfg.skip_bad,
    )


def _headers(paths: list[str], skip_bad: bool) -> list[tuple[str, int, int]]:
    """(mode, width, height) of each file, read from its header."""
    from PIL import Image

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append((im.mode, im.width, im.height))
        except _BAD_IMAGE as exc:
            if not skip_bad:
                raise DataError(unreadable(p, exc)) from None
    return out


def _image_format(table: PathTable, train_rows: np.ndarray, cfg, what: str) -> tuple[str, tuple[int, int]]:
    """The decoded mode and (H, W) of a dataset: from ``data.image_size`` and the headers of
    up to ``HEADER_SAMPLE`` training files chosen with ``data.split_seed``."""
    gen = torch.Generator().manual_seed(cfg.split_seed)
    pick = torch.randperm(len(train_rows), generator=gen)[:HEADER_SAMPLE].sort().values.numpy()
    heads = _headers([table.path(int(r)) for r in train_rows[pick]], cfg.skip_bad)
    if not heads:
        raise DataError(f"{what}: none of the sampled training images is readable")
    mode = "L" if all(channels_of(m) == 1 for m, _, _ in heads) else "RGB"
    if cfg.image_size:
        return mode, (int(cfg.image_size[0]), int(cfg.image_size[1]))
    sizes = sorted({(h, w) for _, w, h in heads})
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h}" for h, w in sizes[:3])
        raise ConfigError(f"{what}: the training images have different sizes ({shown}, ...); "
                          f"set data.image_size = [H, W], the size the streamed images are cropped to")
    return mode, sizes[0]


def check_files_exist(table: PathTable, rows: np.ndarray, listed_in: str) -> None:
    """Stat every listed file once (threads: a network file system answers them in parallel);
    a DataError names the first few missing ones."""
    def missing(chunk):
        return [int(r) for r in chunk if not os.path.isfile(table.path(int(r)))]

    chunks = [rows[i : i + STAT_CHUNK] for i in range(0, len(rows), STAT_CHUNK)]
    if len(chunks) > 1:
        with ThreadPoolExecutor(max_workers=8) as pool:
            gone = [r for part in pool.map(missing, chunks) for r in part]
    else:
        gone = [r for c in chunks for r in missing(c)]
    if gone:
        names = ", ".join(table.name(r) for r in gone[:MISSING_SHOWN])
        more = f" (and {len(gone) - MISSING_SHOWN} more)" if len(gone) > MISSING_SHOWN else ""
        raise DataError(f"{len(gone)} of the {len(rows)} files listed in {listed_in} are missing under "
                        f"{table.root}: {names}{more}")


def file_dataset(name: str, root: Path, parts: dict, classes: list[str], cfg, *, check: dict | None = None,
                 hflip: bool = True) -> ImageDataset:
    """An :class:`ImageDataset` of files under ``root``: ``parts`` maps ``train`` (and optionally
    ``val``, ``test``) to ``(relative names, labels)``; ``check`` maps the parts whose files
    must be stat-ed to the list they came from."""
    names, labels, spans = [], {}, {}
    for part, (part_names, part_labels) in parts.items():
        spans[part] = np.arange(len(names), len(names) + len(part_names))
        names += part_names
        labels[part] = torch.as_tensor(part_labels, dtype=torch.int64)
    table = PathTable(root, names)
    for part, listed_in in (check or {}).items():
        check_files_exist(table, spans[part], listed_in)
    if not len(spans["train"]):
        raise DataError(f"{name}: the training list is empty")
    mode, size = _image_format(table, spans["train"], cfg, name)
    options = stream_options(cfg, mode, size)
    x = {part: ImageFiles(table, rows, options) for part, rows in spans.items()}
    return ImageDataset(x["train"], labels["train"], classes, x.get("test"), labels.get("test"), hflip=hflip,
                        name=name, val_x=x.get("val"), val_y=labels.get("val"))


def streamed_image_folder(cfg) -> ImageDataset | None:
    """An image folder as a streamed dataset, or None when ``data.storage`` (``memory``, or
    ``auto`` within ``data.memory_budget_mb``) keeps it in memory."""
    root = Path(cfg.root)
    if cfg.storage == "memory":
        return None
    splits = ("train", "test") if (root / "train").is_dir() and (root / "test").is_dir() else (None,)
    parts, classes = {}, None
    for part in splits:
        folder = root / part if part else root
        paths, labels, classes = list_image_folder(folder, classes)
        parts[part or "train"] = ([str(p.relative_to(root)) for p in paths], labels)
    if cfg.storage == "auto":
        first = root / parts["train"][0][0]
        mode, w, h = _headers([str(first)], False)[0]
        hh, ww = cfg.image_size or (h, w)
        n = sum(len(v[0]) for v in parts.values())
        if n * channels_of(mode) * hh * ww <= cfg.memory_budget_mb * 2**20:
            return None
    return file_dataset("imagefolder", root, parts, classes, cfg)


def _resolve(root: Path, name: str) -> Path:
    p = Path(name)
    return p if p.is_absolute() else root / p


def _stream_root(data, dataset: str) -> Path:
    if not data.root:
        raise ConfigError(f"data.root must name the image folder for data.name = {dataset!r}")
    if data.storage == "memory":
        raise ConfigError(f"data.storage = 'memory' is not available for data.name = {dataset!r}: it streams "
                          "(use 'stream' or 'auto')")
    root = Path(data.root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    return root


@dataclass
class ImageListOptions:
    train_list: str = field(default="", metadata={"help": "imagelist: training list (`relative/path.jpg label` lines), relative to data.root"})
    val_list: str = field(default="", metadata={"help": "imagelist: validation list (empty: held out of the training list)"})
    test_list: str = field(default="", metadata={"help": "imagelist: test list (empty: held out of the training list)"})


def read_image_list(path: Path) -> tuple[list[str], list[int]]:
    """The ``relative/path label`` lines of a list file (blank lines and ``#`` comments skipped)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the list file {path}: {exc}") from None
    names, labels = [], []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise DataError(f"{path}:{n}: expected `relative/path label` with an integer label >= 0; got {line!r}")
        names.append(parts[0])
        labels.append(int(parts[1]))
    return names, labels


def load_image_list(options: ImageListOptions, data) -> ImageDataset:
    root = _stream_root(data, "imagelist")
    if not options.train_list:
        raise ConfigError("data.train_list must name the training list file for data.name = 'imagelist'")
    parts, check = {}, {}
    for part in ("train", "val", "test"):
        listed = getattr(options, f"{part}_list")
        if listed:
            path = _resolve(root, listed)
            parts[part], check[part] = read_image_list(path), str(path)
    k = 1 + max(max(labels, default=0) for _, labels in parts.values())
    return file_dataset("imagelist", root, parts, [str(i) for i in range(k)], data, check=check)


@dataclass
class INaturalistOptions:
    train_json: str = field(default="", metadata={"help": "inaturalist: training annotations (COCO-style JSON), relative to data.root"})
    val_json: str = field(default="", metadata={"help": "inaturalist: validation annotations (empty: held out of the training set)"})
    test_json: str = field(default="", metadata={"help": "inaturalist: test annotations (empty: held out of the training set)"})


def _read_json(path: Path) -> dict:
    try:
        with path.open("rb") as fh:
            d = json.load(fh)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the annotation file {path}: {exc}") from None
    if not isinstance(d, dict) or not isinstance(d.get("images"), list) or not isinstance(d.get("annotations"), list):
        raise DataError(f"{path}: expected a COCO-style object with 'images' and 'annotations' lists")
    return d


def read_inaturalist(path: Path, d: dict, label_of: dict) -> tuple[list[str], list[int]]:
    """File names and labels of a COCO-style annotation dict (one annotation per image)."""
    try:
        files = {im["id"]: im["file_name"] for im in d["images"]}
        names, labels, seen = [], [], set()
        for a in d["annotations"]:
            image, cat = a["image_id"], a["category_id"]
            if image in seen:
                raise DataError(f"{path}: image {image} has more than one annotation")
            if image not in files:
                raise DataError(f"{path}: an annotation names image {image}, which 'images' does not list")
            if cat not in label_of:
                raise DataError(f"{path}: category {cat} of image {image} is not among the training categories")
            seen.add(image)
            names.append(files[image])
            labels.append(label_of[cat])
    except (KeyError, TypeError) as exc:
        raise DataError(f"{path}: an image or annotation lacks a field ({exc})") from None
    if len(seen) != len(files):
        raise DataError(f"{path}: {len(files) - len(seen)} of its {len(files)} images have no annotation "
                        "(an unlabelled list cannot be a training, validation or test split)")
    return names, labels


def load_inaturalist(options: INaturalistOptions, data) -> ImageDataset:
    root = _stream_root(data, "inaturalist")
    if not options.train_json:
        raise ConfigError("data.train_json must name the training annotations for data.name = 'inaturalist'")
    raw = {part: (_resolve(root, getattr(options, f"{part}_json")),) for part in ("train", "val", "test")
           if getattr(options, f"{part}_json")}
    raw = {part: (path, _read_json(path)) for part, (path,) in raw.items()}
    train = raw["train"][1]
    names = {}
    for c in train.get("categories") or []:
        if isinstance(c, dict) and "id" in c:
            names[c["id"]] = str(c.get("name", c["id"]))
    for a in train["annotations"]:
        if isinstance(a, dict) and "category_id" in a:
            names.setdefault(a["category_id"], str(a["category_id"]))
    ids = sorted(names)
    label_of = {cid: i for i, cid in enumerate(ids)}
    parts = {part: read_inaturalist(path, d, label_of) for part, (path, d) in raw.items()}
    check = {part: str(path) for part, (path, _) in raw.items()}
    return file_dataset("inaturalist", root, parts, [names[i] for i in ids], data, check=check)


STREAMED_DATASETS = {
    "imagelist": (load_image_list, ImageListOptions),
    "inaturalist": (load_inaturalist, INaturalistOptions),
}
