"""Datasets, splits, long-tailed and few-shot subsets, and the on-device loader.

Every dataset is loaded whole into memory as uint8 images ``[N, C, H, W]`` with
int64 labels; small datasets then live on the training device, and batches are
gathered, augmented (random crop with zero padding, horizontal flip) and
normalised there, in one batched pass. Nothing is downloaded; file formats are
parsed without executing anything (CIFAR's pickles go through a restricted
unpickler that only rebuilds numpy arrays, lists, dicts and strings).

Splits: datasets with an official test split keep it; the others (digits, image
folders without train/test subfolders, the synthetic set) are split once,
stratified, with ``data.split_seed``. A validation split is then held out of the
training data (stratified, before any subsetting, so it stays balanced), and the
long-tailed / few-shot / sized subsets are drawn from the rest. All draws use a
local generator; no global RNG is touched.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, DataError
from .hookspecs import hookimpl

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"


# ------------------------------------------------------------------------------ memory budget


def available_memory() -> int | None:
    """Bytes of memory this process may still allocate (None when the system does not say).

    ``MemAvailable`` of /proc/meminfo (else the free pages), bounded by the room left
    under a cgroup v2 memory limit (a container's), which /proc/meminfo does not show.
    """
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            room = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


def _bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_memory(nbytes: int, what: str, error: type[Exception] = DataError) -> None:
    """Refuse, before allocating, ``nbytes`` that the machine cannot hold; ``what`` names the
    file or key the size was read from."""
    avail = available_memory()
    if avail is not None and nbytes > avail:
        raise error(f"{what} needs {_bytes(nbytes)} of memory; this machine has {_bytes(avail)} available")


@dataclass
class ImageDataset:
    """A dataset: images ``[N, C, H, W]`` and int64 labels ``[N]``.

    The images are a uint8 tensor (the whole set in memory) or, for streamed datasets,
    an image source that stays on disk (:class:`batchkin.stream.ImageFiles`: indexable
    by index tensors like a tensor, with a ``shape``). A dataset that ships its own
    validation list sets ``val_x`` / ``val_y``; the validation split is then that list
    and no part of the training data is held out.
    """

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]
    test_x: torch.Tensor | None = None
    test_y: torch.Tensor | None = None
    hflip: bool = True  # whether horizontal flips preserve the labels' meaning
    name: str = ""
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None

    def __post_init__(self):
        for what, x, y in (("training", self.x, self.y), ("test", self.test_x, self.test_y),
                           ("validation", self.val_x, self.val_y)):
            if x is None:
                continue
            if not isinstance(x, torch.Tensor):
                if not hasattr(x, "stats") or len(x.shape) != 4:
                    raise DataError(f"{self.name}: {what} images must be a uint8 tensor [N, C, H, W] or an image source")
            elif x.dtype != torch.uint8 or x.dim() != 4:
                raise DataError(f"{self.name}: {what} images must be uint8 [N, C, H, W]; got {x.dtype} {tuple(x.shape)}")
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise DataError(f"{self.name}: {what} labels must be int64 [{x.shape[0]}]; got {y.dtype} {tuple(y.shape)}")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(self.classes)):
                bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
                raise DataError(
                    f"{self.name}: {what} label {bad} is out of range for the {len(self.classes)} classes "
                    f"(labels must lie in [0, {len(self.classes) - 1}]; found {int(y.min())}..{int(y.max())})"
                )
        for what, x in (("test", self.test_x), ("validation", self.val_x)):
            if x is not None and tuple(x.shape[1:]) != tuple(self.x.shape[1:]):
                raise DataError(f"{self.name}: {what} images {tuple(x.shape[1:])} differ from training images {tuple(self.x.shape[1:])}")


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self):
        return len(self.y)


@dataclass
class Splits:
    """The train / val / test splits of a run, plus what the metrics need."""

    train: Split
    val: Split
    test: Split
    classes: list[str]
    hflip: bool
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])

    def train_counts(self) -> torch.Tensor:
        return torch.bincount(self.train.y, minlength=self.num_classes)


# ------------------------------------------------------------------------------ subsets


def long_tail_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """Images kept per class in the LDAM/BBN long-tailed profile.

    ``n_c = int(n_max * IF ** (-c / (C - 1)))`` for class ``c = 0 .. C-1``; with
    ``n_max = 5000, C = 10, IF = 100`` this is ``[5000, 2997, 1796, 1077, 645, 387,
    232, 139, 83, 50]``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"the number of classes must be an integer >= 1; got {num_classes!r}")
    if isinstance(n_max, bool) or not isinstance(n_max, int) or n_max < 1:
        raise ConfigError(f"n_max must be an integer >= 1; got {n_max!r}")
    if not isinstance(imbalance_factor, (int, float)) or not math.isfinite(imbalance_factor) or imbalance_factor < 1:
        raise ConfigError(f"data.imbalance_factor must be a number >= 1; got {imbalance_factor!r}")
    if num_classes == 1:
        return [n_max]
    # the epsilon keeps float error (49 * 49 ** -1 = 0.999...) from truncating a whole image away
    return [int(n_max * imbalance_factor ** (-c / (num_classes - 1)) + 1e-9) for c in range(num_classes)]


def proportional_counts(have: list[int], total: int) -> list[int]:
    """Split ``total`` over classes in proportion to ``have`` (largest remainders), summing exactly to ``total``."""
    n = sum(have)
    exact = [h * total / n for h in have]
    counts = [int(e) for e in exact]
    order = sorted(range(len(have)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _by_class(y: torch.Tensor, num_classes: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Indices of each class, in a seeded random order."""
    order = torch.randperm(len(y), generator=gen)
    ys = y[order]
    return [order[ys == c] for c in range(num_classes)]


def stratified_split(y: torch.Tensor, num_classes: int, fraction: float, gen: torch.Generator):
    """(kept, held_out) index tensors; ``fraction`` of every class is held out (at least one
    image when the class has two or more)."""
    kept, held = [], []
    for idx in _by_class(y, num_classes, gen):
        n = len(idx)
        k = int(round(n * fraction))
        if fraction > 0 and n >= 2:
            k = min(max(k, 1), n - 1)
        held.append(idx[:k])
        kept.append(idx[k:])
    return torch.cat(kept).sort().values, torch.cat(held).sort().values


def subset_indices(y: torch.Tensor, num_classes: int, counts: list[int], gen: torch.Generator, what: str) -> torch.Tensor:
    """A seeded random subset keeping ``counts[c]`` images of class ``c``."""
    out = []
    for c, idx in enumerate(_by_class(y, num_classes, gen)):
        if counts[c] < 1:
            raise DataError(f"{what}: class {c} has no training images left (it would keep {counts[c]})")
        if counts[c] > len(idx):
            raise DataError(f"{what}: class {c} needs {counts[c]} training images but has only {len(idx)}")
        out.append(idx[: counts[c]])
    return torch.cat(out).sort().values


def make_splits(ds: ImageDataset, cfg) -> Splits:
    """Split ``ds`` into train / val / test and apply the configured training subset."""
    if getattr(cfg, "storage", "auto") == "stream" and isinstance(ds.x, torch.Tensor):
        raise ConfigError(f"data.storage = 'stream' is not available for data.name = {cfg.name!r}, which is loaded "
                          "into memory (streamed: imagefolder, imagelist, inaturalist); use 'memory' or 'auto'")
    num_classes = len(ds.classes)
    gen = torch.Generator().manual_seed(cfg.split_seed)
    if ds.test_x is None:
        keep, test = stratified_split(ds.y, num_classes, cfg.test_fraction, gen)
        pool_x, pool_y = ds.x[keep], ds.y[keep]
        test_split = Split(ds.x[test], ds.y[test])
    else:
        pool_x, pool_y = ds.x, ds.y
        test_split = Split(ds.test_x, ds.test_y)
    if ds.val_x is None:
        train_idx, val_idx = stratified_split(pool_y, num_classes, cfg.val_fraction, gen)
        tx, ty = pool_x[train_idx], pool_y[train_idx]
        val_split = Split(pool_x[val_idx], pool_y[val_idx])
    else:  # the dataset's own validation list
        tx, ty = pool_x, pool_y
        val_split = Split(ds.val_x, ds.val_y)
    available = torch.bincount(ty, minlength=num_classes).tolist()
    if min(available) < 1:
        raise DataError(_empty_class_message(ds, available.index(0)))
    sub = None
    if cfg.imbalance_factor > 1:
        counts = long_tail_counts(max(available), num_classes, cfg.imbalance_factor)
        # classes smaller than the profile asks for keep what they have
        counts = [min(n, a) for n, a in zip(counts, available)]
        if min(counts) < 1:
            c = counts.index(min(counts))
            raise DataError(
                f"data.imbalance_factor = {cfg.imbalance_factor} leaves class {c} with no training images "
                f"(n_max = {max(available)}); use an imbalance factor <= {max(available)}"
            )
        sub = subset_indices(ty, num_classes, counts, gen, "data.imbalance_factor")
    elif cfg.few_shot:
        sub = subset_indices(ty, num_classes, [cfg.few_shot] * num_classes, gen, f"data.few_shot = {cfg.few_shot}")
    if cfg.train_size:
        base = sub if sub is not None else torch.arange(len(ty))
        if cfg.train_size > len(base):
            raise DataError(f"data.train_size = {cfg.train_size} exceeds the {len(base)} training images available")
        have = torch.bincount(ty[base], minlength=num_classes).tolist()
        counts = proportional_counts(have, cfg.train_size)
        if min(counts) < 1:
            raise DataError(f"data.train_size = {cfg.train_size} leaves class {counts.index(min(counts))} with no "
                            f"training images; use at least {num_classes}")
        sub = base[subset_indices(ty[base], num_classes, counts, gen, f"data.train_size = {cfg.train_size}")]
    if sub is not None:
        tx, ty = tx[sub], ty[sub]
    train = Split(tx, ty)
    mean, std = image_stats(train.x, cfg.split_seed)
    hflip = ds.hflip if cfg.hflip is None else cfg.hflip
    return Splits(train, val_split, test_split, list(ds.classes), hflip, mean, std)


def image_stats(x, seed: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (std at least 1e-3) of images in [0, 1]: over every image of a
    tensor; an image source on disk estimates them from a seeded sample (its ``stats``)."""
    if not isinstance(x, torch.Tensor):
        return x.stats(seed)
    xf = x.float() / 255.0
    return xf.mean(dim=(0, 2, 3)).tolist(), xf.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


def check_crop_padding(cfg, size: tuple[int, int]) -> None:
    """The random crop's padding must leave part of the image in every crop: a padding as large
    as the image crops nothing but zeros (and pads the batch to a huge size)."""
    if cfg.augment and cfg.crop_padding >= min(size):
        raise ConfigError(
            f"data.crop_padding = {cfg.crop_padding} must be smaller than the images ({size[0]}x{size[1]}): "
            f"a larger padding crops only zeros; use at most {min(size) - 1} (or data.augment = false)"
        )


def _empty_class_message(ds: ImageDataset, c: int) -> str:
    """Why class ``c`` has no training image: no image of the dataset has its label (a gap in
    the labels, or class names that do not match them), or its few images were all held out."""
    total = int((ds.y == c).sum()) + (int((ds.test_y == c).sum()) if ds.test_y is not None else 0)
    name = f"class {c} ({ds.classes[c]})"
    if total:
        return f"{ds.name}: {name} has no training images (all its {total} image(s) are in the validation or test split)"
    labels = torch.cat([ds.y] + ([ds.test_y] if ds.test_y is not None else []))
    present = torch.unique(labels)
    return (f"{ds.name}: no image has label {c} of the {len(ds.classes)} classes; the labels found are "
            f"{_label_list(present.tolist())}: labels must number the classes 0..{len(ds.classes) - 1}")


def _label_list(labels: list[int], limit: int = 8) -> str:
    shown = ", ".join(map(str, labels[:limit]))
    return shown + (f", ... ({len(labels)} distinct)" if len(labels) > limit else "")


# ------------------------------------------------------------------------------ loaders


def load_digits(cfg) -> ImageDataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes; no download)."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    return ImageDataset(x, y, [str(i) for i in range(10)], hflip=False, name="digits")


IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_READ_CHUNK = 1 << 24


def _read_exactly(fh, n: int) -> bytes:
    """``n`` bytes of ``fh`` read in chunks (a lying header never allocates more than the file
    holds), plus one more if the file has more: the caller checks the length."""
    buf = bytearray()
    while len(buf) <= n:
        chunk = fh.read(min(_READ_CHUNK, n + 1 - len(buf)))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (the MNIST format), optionally gzip-compressed.

    The header's shape is checked against the file's size (for ``.gz`` files, against the
    bytes that decompress) and against the memory available before the data is read.
    """
    path = Path(path)
    gz = path.suffix == ".gz"
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
            head = fh.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0:
                raise DataError(f"{path} is not an IDX file (bad magic number)")
            code, ndim = head[2], head[3]
            if code not in IDX_DTYPES or ndim < 1:
                raise DataError(f"{path} is not an IDX file (type code {code:#x}, {ndim} dimensions)")
            dims = fh.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise DataError(f"{path} is truncated (incomplete header)")
            shape = struct.unpack(f">{ndim}I", dims)
            dtype = np.dtype(IDX_DTYPES[code])
            expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
            header = 4 + 4 * ndim

            def corrupt(have: int) -> DataError:
                return DataError(f"{path} is truncated or corrupt: {have} data bytes, expected {expected} "
                                 f"for shape {shape}")

            if not gz:
                have = os.fstat(fh.fileno()).st_size - header
                if have != expected:
                    raise corrupt(have)
            check_memory(expected, f"{path} (shape {shape})")
            raw = _read_exactly(fh, expected)
            if len(raw) != expected:
                raise corrupt(len(raw) if len(raw) < expected else f"more than {expected}")
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {exc.strerror or exc if isinstance(exc, OSError) else exc}") from None
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _check_folder(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise DataError(f"data.root {root} is a file; it must name the dataset's folder")
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")


def _find(root: Path, stems: list[str]) -> Path:
    for stem in stems:
        for cand in (root / stem, root / f"{stem}.gz"):
            if cand.is_file():
                return cand
    raise DataError(f"{root}: none of {', '.join(stems)} (optionally .gz) found")


def load_idx_folder(root: str | Path, name: str = "idx", classes: list[str] | None = None, hflip: bool = True) -> ImageDataset:
    """An MNIST-format folder: train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-*."""
    root = Path(root)
    _check_folder(root)
    parts, label_files = {}, {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        xf = _find(root, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"])
        yf = _find(root, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"])
        xi, yi = read_idx(xf), read_idx(yf)
        if xi.ndim != 3 or xi.dtype != np.uint8:
            raise DataError(f"{xf}: {split} images must be uint8 [N, H, W]; got {xi.dtype} {xi.shape}")
        if len(xi) == 0 or 0 in xi.shape[1:]:
            raise DataError(f"{xf} holds no {split} images (shape {xi.shape})" if len(xi) == 0 else
                            f"{xf}: {split} images of size {xi.shape[1]}x{xi.shape[2]} have no pixels")
        if yi.ndim != 1 or yi.dtype.kind not in "iu":
            raise DataError(f"{yf}: {split} labels must be integers [N]; got {yi.dtype} {yi.shape}")
        if len(yi) != len(xi):
            raise DataError(f"{root}: {len(yi)} {split} labels ({yf.name}) for {len(xi)} images ({xf.name})")
        parts[split], label_files[split] = (xi, yi), yf
    classes = _idx_classes(parts, label_files, classes)
    tensors = {k: (torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))) for k, (x, y) in parts.items()}
    return ImageDataset(*tensors["train"], classes, *tensors["test"], hflip=hflip, name=name)


def _idx_classes(parts: dict, label_files: dict, classes: list[str] | None) -> list[str]:
    """The class names: given, or ``"0"..str(K-1)`` for labels ``0..K-1`` with every class
    present. Each bound is checked from the labels themselves, before any list of K names is
    built (one label of 2,000,000,000 must not make two billion classes)."""
    for split, (_, y) in parts.items():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0:
            raise DataError(f"{label_files[split]}: label {lo} is negative; labels number the classes from 0")
        if classes is not None and hi >= len(classes):
            raise DataError(f"{label_files[split]}: label {hi} is out of range for the {len(classes)} classes "
                            f"(labels 0..{len(classes) - 1})")
    if classes is not None:
        return classes
    split = max(parts, key=lambda k: int(parts[k][1].max()))
    hi = int(parts[split][1].max())
    present = np.unique(np.concatenate([y for _, y in parts.values()]))
    if hi + 1 > len(present):
        missing = np.setdiff1d(np.arange(min(hi + 1, len(present) + 8)), present)[:8].tolist()
        raise DataError(
            f"{label_files[split]}: label {hi} implies {hi + 1} classes, but only {len(present)} distinct labels "
            f"occur (labels {_label_list(missing)} never do); labels must number the classes 0..K-1"
        )
    return [str(i) for i in range(hi + 1)]


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def load_fashion_mnist(cfg) -> ImageDataset:
    return load_idx_folder(cfg.root or FASHION_MNIST_ROOT, "fashion_mnist", FASHION_CLASSES, hflip=True)


def load_idx(cfg) -> ImageDataset:
    if not cfg.root:
        raise ConfigError("data.root must name the IDX folder for data.name = 'idx'")
    return load_idx_folder(cfg.root, "idx")


class _SafeUnpickler(pickle.Unpickler):
    """Rebuilds plain containers and numpy arrays only; anything else is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _load_cifar_batch(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"CIFAR file not found: {path}")
    try:
        with path.open("rb") as fh:
            d = _SafeUnpickler(fh, encoding="bytes").load()
    except Exception as exc:
        raise DataError(f"{path} is not a readable CIFAR python-format file: {type(exc).__name__}: {exc}") from None
    if not isinstance(d, dict):
        raise DataError(f"{path} is not a CIFAR batch (expected a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar_arrays(d: dict, path: Path, label_key: str, num_classes: int):
    data, labels = d.get("data"), d.get(label_key)
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise DataError(f"{path}: 'data' must be a uint8 array [N, 3072]")
    # the type of every label is checked before numpy sees the list: a list whose items are
    # shared references to one huge list unpickles from a few bytes and explodes in np.asarray
    if isinstance(labels, list) and all(type(v) is int for v in labels):
        labels = np.array(labels, dtype=np.int64) if all(-(2**63) <= v < 2**63 for v in labels) else None
    elif isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        labels = labels.astype(np.int64)
    else:
        labels = None
    if labels is None or labels.shape != (len(data),):
        raise DataError(f"{path}: {label_key!r} must list one integer label per image ({len(data)} images)")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise DataError(f"{path}: label {bad} is out of range for the {num_classes} classes (labels 0..{num_classes - 1})")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def load_cifar(cfg, which: int) -> ImageDataset:
    if not cfg.root:
        raise ConfigError(f"data.root must name the CIFAR-{which} python-format folder")
    root = Path(cfg.root)
    _check_folder(root)
    if which == 10:
        files, label_key, meta, meta_key = [f"data_batch_{i}" for i in range(1, 6)], "labels", "batches.meta", "label_names"
        test = "test_batch"
    else:
        files, label_key, meta, meta_key, test = ["train"], "fine_labels", "meta", "fine_label_names", "test"
    xs, ys = zip(*(_cifar_arrays(_load_cifar_batch(root / f), root / f, label_key, which) for f in files))
    tx, ty = _cifar_arrays(_load_cifar_batch(root / test), root / test, label_key, which)
    classes = [str(i) for i in range(which)]
    if (root / meta).is_file():
        names = _load_cifar_batch(root / meta).get(meta_key)
        if isinstance(names, list) and len(names) == which and all(isinstance(n, (bytes, str)) for n in names):
            classes = [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]
    return ImageDataset(torch.cat(xs), torch.cat(ys), classes, tx, ty, hflip=True, name=f"cifar{which}")


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def list_image_folder(root: Path, classes: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """The image files of a folder with one subfolder per class (sorted), their labels and the
    class names (the subfolders' names, sorted, unless ``classes`` gives them)."""
    if classes is None:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root}: no class subfolders found")
    paths, labels = [], []
    for c, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            raise DataError(f"{root}: class folder {name!r} is missing")
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DataError(f"{folder}: no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        paths += found
        labels += [c] * len(found)
    return paths, labels, classes


def _mode(channels: int) -> str:
    return "grey (1 channel)" if channels == 1 else f"RGB ({channels} channels)"


def _read_image(f: Path, size: list[int]) -> np.ndarray:
    """One image as uint8 ``[C, H, W]`` (grey or RGB), resized to ``size`` when given. The
    size in the file's header is checked (Pillow's decompression-bomb limit, the memory
    available) before the pixels are decoded."""
    from PIL import Image

    try:
        with Image.open(f) as im:
            w, h = im.size
            if not w or not h:
                raise DataError(f"{f} has no pixels ({w}x{h})")
            check_memory(4 * w * h * len(im.getbands()), f"{f} ({w}x{h} pixels)")
            im.load()
            im = im.convert("L" if im.mode in ("1", "L", "I;16", "I") else "RGB")
            if size:
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except DataError:
        raise
    except MemoryError:
        raise DataError(f"{f} is too large to decode in the memory available") from None
    except Exception as exc:  # Pillow raises many kinds (OSError, SyntaxError, DecompressionBombError, ...)
        raise DataError(f"{f} is not a readable image: {exc}") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _read_image_folder(root: Path, size: list[int], classes: list[str] | None = None):
    paths, labels, classes = list_image_folder(root, classes)
    n = len(paths)
    if size:  # the whole set's size is known before the first image is decoded
        check_memory(n * 3 * size[0] * size[1], f"data.image_size = {size} for the {n} images of {root}", ConfigError)
    images, shape, first = [], None, None
    for f in paths:
        arr = _read_image(f, size)
        if shape is None:
            shape, first = arr.shape, f
            check_memory(n * arr.size, f"the {n} images of {root} ({arr.shape[1]}x{arr.shape[2]}x{arr.shape[0]})")
        elif arr.shape[0] != shape[0]:
            raise DataError(
                f"images with different channels: {f} is {_mode(arr.shape[0])}, {first} is {_mode(shape[0])}; "
                f"convert the images to one mode (all grey or all RGB)"
            )
        elif arr.shape != shape:
            raise DataError(
                f"images of mixed sizes: {f} is {arr.shape[1]}x{arr.shape[2]}x{arr.shape[0]}, "
                f"{first} is {shape[1]}x{shape[2]}x{shape[0]}; set data.image_size = [H, W] to resize"
            )
        images.append(arr)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64), classes


def load_image_folder(cfg) -> ImageDataset:
    """One subfolder per class; ``train/`` and ``test/`` subfolders are used as the splits when present."""
    if not cfg.root:
        raise ConfigError("data.root must name the image folder for data.name = 'imagefolder'")
    root = Path(cfg.root)
    _check_folder(root)
    _check_image_size(cfg.image_size)
    from .stream import streamed_image_folder

    streamed = streamed_image_folder(cfg)  # None when data.storage keeps the folder in memory
    if streamed is not None:
        return streamed
    if (root / "train").is_dir() and (root / "test").is_dir():
        x, y, classes = _read_image_folder(root / "train", cfg.image_size)
        tx, ty, _ = _read_image_folder(root / "test", cfg.image_size, classes)
        if tx.shape[1:] != x.shape[1:]:
            raise DataError(f"{root}: test images {tuple(tx.shape[1:])} differ from training images {tuple(x.shape[1:])}")
        return ImageDataset(x, y, classes, tx, ty, name="imagefolder")
    x, y, classes = _read_image_folder(root, cfg.image_size)
    return ImageDataset(x, y, classes, name="imagefolder")


def _check_image_size(size: list[int]) -> None:
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if size and limit and size[0] * size[1] > limit:
        raise ConfigError(f"data.image_size = {size} is {size[0] * size[1]} pixels per image, beyond Pillow's "
                          f"decompression-bomb limit of {limit} pixels")


def load_synthetic(cfg) -> ImageDataset:
    """A learnable synthetic set for tests: one smooth random prototype per class plus noise."""
    gen = torch.Generator().manual_seed(cfg.split_seed + 7919)
    k, n = cfg.synthetic_classes, cfg.synthetic_per_class
    c, h, w = cfg.synthetic_shape
    # float32 noise made in place, the uint8 images and the int64 labels
    check_memory(k * n * (5 * c * h * w + 8), f"the synthetic set ({k} classes x {n} images of {c}x{h}x{w}: "
                 "data.synthetic_classes, data.synthetic_per_class, data.synthetic_shape)", ConfigError)
    proto = torch.rand(k, c, max(h // 2, 1), max(w // 2, 1), generator=gen)
    proto = torch.nn.functional.interpolate(proto, size=(h, w), mode="bilinear", align_corners=False)
    noise = torch.randn(k, n, c, h, w, generator=gen)
    x = noise.mul_(0.15).add_(proto[:, None]).clamp_(0, 1).mul_(255).round_().to(torch.uint8).reshape(k * n, c, h, w)
    y = torch.arange(k).repeat_interleave(n)
    return ImageDataset(x, y, [f"class{i}" for i in range(k)], hflip=False, name="synthetic")


BUILTIN_DATASETS = {
    "digits": load_digits,
    "fashion_mnist": load_fashion_mnist,
    "idx": load_idx,
    "cifar10": lambda cfg: load_cifar(cfg, 10),
    "cifar100": lambda cfg: load_cifar(cfg, 100),
    "imagefolder": load_image_folder,
    "synthetic": load_synthetic,
}


@hookimpl
def register_datasets(register):
    from .stream import STREAMED_DATASETS

    for name, loader in BUILTIN_DATASETS.items():
        register(name, loader)
    for name, (loader, options) in STREAMED_DATASETS.items():
        register(name, loader, options=options)


# ------------------------------------------------------------------------------ on-device batches


class ShuffleSampler:
    """The engine's default sampler: one seeded permutation per epoch, sharded across ranks.

    Epoch ``e``'s permutation comes from a generator seeded with ``(seed, e)``, so every
    rank computes the same permutation; step ``s`` takes the global batch
    ``perm[s*B*W : (s+1)*B*W]`` (B the per-rank batch, W the world size) and rank
    ``r`` its slice ``r*B : (r+1)*B``. Two ranks with batch b therefore see exactly
    the samples one rank with batch 2b sees. ``state_dict`` records the position in
    the epoch, so a resume continues mid-epoch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, *, drop_last: bool = True, rank: int = 0, world: int = 1):
        if n < 1:
            raise DataError("the training split is empty")
        if batch_size * world > n and drop_last:
            raise ConfigError(
                f"data.batch_size = {batch_size}{f' x {world} processes' if world > 1 else ''} exceeds the "
                f"{n} training images; lower data.batch_size or set data.drop_last = false"
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.drop_last, self.rank, self.world = drop_last, rank, world
        self.epoch, self.position = 1, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.position = 0
        self.epoch = epoch

    def __len__(self) -> int:
        g = self.batch_size * self.world
        return self.n // g if self.drop_last else math.ceil(self.n / g)

    def permutation(self, epoch: int) -> torch.Tensor:
        from batchkin.kernels.rng import derive_key

        gen = torch.Generator().manual_seed(derive_key(self.seed, epoch, 0x5A))
        return torch.randperm(self.n, generator=gen)

    def __iter__(self):
        perm = self.permutation(self.epoch)
        g = self.batch_size * self.world
        for step in range(self.position, len(self)):
            chunk = perm[step * g : (step + 1) * g]
            per = math.ceil(len(chunk) / self.world)
            mine = chunk[self.rank * per : (self.rank + 1) * per]
            self.position = step + 1
            yield {"": mine}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class DeviceData:
    """A split on the device as uint8, with batched augmentation and normalisation.

    ``DeviceData(split, ...)`` of a split whose images stay on disk builds a
    :class:`batchkin.stream.StreamData` (same interface, batches decoded by workers).
    The trainer iterates :meth:`steps` for the training indices.
    """

    def __new__(cls, split: Split | None = None, *args, **kwargs):
        if cls is DeviceData and split is not None and not isinstance(split.x, torch.Tensor):
            from .stream import StreamData

            cls = StreamData
        return super().__new__(cls)

    def __init__(self, split: Split, splits: Splits, device: torch.device):
        self.x = split.x.to(device)
        self.y = split.y.to(device)
        self.device = device
        c = self.x.shape[1]
        self.mean = torch.tensor(splits.mean, device=device).view(1, c, 1, 1)
        self.std = torch.tensor(splits.std, device=device).view(1, c, 1, 1)

    def __len__(self):
        return len(self.y)

    def normalize(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return (x_uint8.float() / 255.0 - self.mean) / self.std

    def batch(self, idx: torch.Tensor, *, augment: bool, padding: int, hflip: bool, gen: torch.Generator | None,
              shard: tuple[int, int] = (0, 1)):
        idx = idx.to(self.device, non_blocking=True)
        x = self.x[idx]
        if augment:
            x = random_crop_flip(x, padding, hflip, gen, shard)
        return self.normalize(x), self.y[idx]

    def eval_batches(self, batch_size: int, rank: int = 0, world: int = 1):
        """Contiguous evaluation batches; with several ranks each takes an interleaved shard."""
        idx = torch.arange(rank, len(self), world, device=self.device)
        for start in range(0, len(idx), batch_size):
            sel = idx[start : start + batch_size]
            yield self.normalize(self.x[sel]), self.y[sel]

    def steps(self, state):
        """The training steps' index dicts: the run's sampler (a streamed split also loads
        each step's images ahead here)."""
        return iter(state.sampler)

    def close(self) -> None:
        """Release what the split holds beyond memory (a streamed split's workers)."""


def random_crop_flip(x: torch.Tensor, padding: int, hflip: bool, gen: torch.Generator | None,
                     shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Batched random crop with zero padding and random horizontal flip, on ``x``'s device.

    With ``shard = (rank, world)`` the random numbers are drawn for the whole global
    batch (``world`` shards of this size) and this rank uses its slice, so every
    sample is augmented the same way whatever the number of processes.
    """
    b, c, h, w = x.shape
    rank, world = shard
    mine = slice(rank * b, (rank + 1) * b)
    if padding > 0:
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        off = torch.randint(0, 2 * padding + 1, (2, b * world), generator=gen, device=x.device)[:, mine]
        rows = off[0, :, None] + torch.arange(h, device=x.device)
        cols = off[1, :, None] + torch.arange(w, device=x.device)
        if hflip:
            flip = (torch.rand(b * world, generator=gen, device=x.device) < 0.5)[mine]
            cols = torch.where(flip[:, None], cols.flip(1), cols)
        bi = torch.arange(b, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        # a real copy to standard strides: for C = 1 the permuted result claims to be
        # contiguous with odd strides, which some CPU convolution backward kernels mishandle
        return x.clone(memory_format=torch.contiguous_format)
    elif hflip:
        flip = (torch.rand(b * world, generator=gen, device=x.device) < 0.5)[mine]
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x.contiguous()
