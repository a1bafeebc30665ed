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
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, DataError
from .hookspecs import hookimpl

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"


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
                raise DataError(
                    f"{self.name}: {what} labels must lie in [0, {len(self.classes) - 1}]; "
                    f"found {int(y.min())}..{int(y.max())}"
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
        empty = available.index(0)
        raise DataError(f"{ds.name}: class {empty} ({ds.classes[empty]}) has no training images")
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


# ------------------------------------------------------------------------------ loaders


def load_digits(cfg) -> ImageDataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes; no download)."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    return ImageDataset(x, y, [str(i) for i in range(10)], hflip=False, name="digits")


def _open_maybe_gz(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        return raw
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (the MNIST format), optionally gzip-compressed."""
    raw = _open_maybe_gz(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = raw[2], raw[3]
    if code not in dtypes or ndim < 1:
        raise DataError(f"{path} is not an IDX file (type code {code:#x}, {ndim} dimensions)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (incomplete header)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(dtypes[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path} is truncated or corrupt: {len(raw) - header} data bytes, expected {expected} for shape {shape}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(root: Path, stems: list[str]) -> Path:
    for stem in stems:
        for cand in (root / stem, root / f"{stem}.gz"):
            if cand.is_file():
                return cand
    raise DataError(f"{root}: none of {', '.join(stems)} (optionally .gz) found")


def load_idx_folder(root: str | Path, name: str = "idx", classes: list[str] | None = None, hflip: bool = True) -> ImageDataset:
    """An MNIST-format folder: train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-*."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        xi = read_idx(_find(root, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"]))
        yi = read_idx(_find(root, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"]))
        if xi.ndim != 3 or xi.dtype != np.uint8:
            raise DataError(f"{root}: {split} images must be uint8 [N, H, W]; got {xi.dtype} {xi.shape}")
        if yi.ndim != 1 or len(yi) != len(xi):
            raise DataError(f"{root}: {len(yi)} {split} labels for {len(xi)} images")
        parts[split] = (torch.from_numpy(xi.copy()).unsqueeze(1), torch.from_numpy(yi.astype(np.int64)))
    k = int(max(parts["train"][1].max(), parts["test"][1].max())) + 1
    classes = classes if classes is not None else [str(i) for i in range(k)]
    return ImageDataset(*parts["train"], classes, *parts["test"], hflip=hflip, name=name)


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


def _cifar_arrays(d: dict, path: Path, label_key: str):
    data, labels = d.get("data"), d.get(label_key)
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise DataError(f"{path}: 'data' must be a uint8 array [N, 3072]")
    labels = np.asarray(labels, dtype=np.int64) if labels is not None else None
    if labels is None or labels.shape != (len(data),):
        raise DataError(f"{path}: {label_key!r} must list one label per image")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def load_cifar(cfg, which: int) -> ImageDataset:
    if not cfg.root:
        raise ConfigError(f"data.root must name the CIFAR-{which} python-format folder")
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    if which == 10:
        files, label_key, meta, meta_key = [f"data_batch_{i}" for i in range(1, 6)], "labels", "batches.meta", "label_names"
        test = "test_batch"
    else:
        files, label_key, meta, meta_key, test = ["train"], "fine_labels", "meta", "fine_label_names", "test"
    xs, ys = zip(*(_cifar_arrays(_load_cifar_batch(root / f), root / f, label_key) for f in files))
    tx, ty = _cifar_arrays(_load_cifar_batch(root / test), root / test, label_key)
    classes = [str(i) for i in range(which)]
    if (root / meta).is_file():
        names = _load_cifar_batch(root / meta).get(meta_key)
        if isinstance(names, list) and len(names) == which:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
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
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{folder}: no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        paths += files
        labels += [c] * len(files)
    return paths, labels, classes


def _read_image_folder(root: Path, size: list[int], classes: list[str] | None = None):
    from PIL import Image, UnidentifiedImageError

    paths, labels, classes = list_image_folder(root, classes)
    images, shape, first = [], None, None
    for f in paths:
        try:
            with Image.open(f) as im:
                im.load()
                im = im.convert("L" if im.mode in ("1", "L", "I;16", "I") else "RGB")
                if size:
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(f"{f} is not a readable image: {exc}") from None
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        if shape is None:
            shape, first = arr.shape, f
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
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
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


def load_synthetic(cfg) -> ImageDataset:
    """A learnable synthetic set for tests: one smooth random prototype per class plus noise."""
    gen = torch.Generator().manual_seed(cfg.split_seed + 7919)
    k, n = cfg.synthetic_classes, cfg.synthetic_per_class
    c, h, w = cfg.synthetic_shape
    proto = torch.rand(k, c, max(h // 2, 1), max(w // 2, 1), generator=gen)
    proto = torch.nn.functional.interpolate(proto, size=(h, w), mode="bilinear", align_corners=False)
    noise = torch.randn(k, n, c, h, w, generator=gen) * 0.15
    x = (proto[:, None] + noise).clamp(0, 1).mul(255).round().to(torch.uint8).reshape(k * n, c, h, w)
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
