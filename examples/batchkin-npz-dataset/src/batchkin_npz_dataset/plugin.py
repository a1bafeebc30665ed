"""The ``npz`` dataset: images and labels from a user's ``.npz`` file.

Select it with ``data.name = "npz"`` and ``data.path = "path/to/file.npz"``:
``path`` is the dataset's own option (:class:`NpzOptions`, registered with the
dataset), checked by the engine like its own ``[data]`` keys. The older spelling
``data.root = "path/to/file.npz"`` still works when ``data.path`` is not set. The
archive, as written by
``np.savez`` / ``np.savez_compressed``, holds:

=========== =========================================== ==========
array       contents                                    required
=========== =========================================== ==========
``x``       uint8 images ``[N, H, W]`` or ``[N, H, W, C]`` yes
``y``       integer labels ``[N]``, in ``[0, K)``        yes
``x_test``  uint8 test images, same ``H, W (, C)``        no (with ``y_test``)
``y_test``  integer test labels                          no (with ``x_test``)
``classes`` ``K`` class names (a string array)           no (default ``"0"``..)
``hflip``   a boolean scalar: horizontal flips keep the  no (default true)
            labels' meaning
=========== =========================================== ==========

Without a test split the engine holds one out, stratified, with
``data.test_fraction``. Without ``classes``, ``K`` is the largest label plus one,
and may not exceed the number of images in the file (every class needs one).
The file is read with ``allow_pickle=False``: nothing in it is ever executed, and
an array of Python objects is refused. Every size in the file (each array's
header, the largest label) is checked against what the file holds and the
memory available before anything is allocated. Every problem (missing file,
missing or unknown arrays, wrong dtypes or shapes, labels out of range,
mismatched lengths, a truncated or corrupt archive) stops the run with a
``DataError`` naming the file and the array.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from batchkin.data import ImageDataset, check_memory
from batchkin.errors import ConfigError, DataError
from batchkin.hookspecs import hookimpl
from batchkin.schema import suggest

# the arrays a file may hold, and whether each is required
ARRAYS = {"x": True, "y": True, "x_test": False, "y_test": False, "classes": False, "hflip": False}

ZIP_MAGIC, EMPTY_ZIP_MAGIC = b"PK\x03\x04", b"PK\x05\x06"
_CORRUPT = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error)


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array in the archive, read without unpickling anything."""
    try:
        with path.open("rb") as fh:
            magic = fh.read(6)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if magic == b"\x93NUMPY":
        raise DataError(f"{path} holds a single .npy array, not an .npz archive; write it with np.savez(path, x=..., y=...)")
    if not magic.startswith((ZIP_MAGIC, EMPTY_ZIP_MAGIC)):
        what = "is empty" if not magic else "is not an .npz archive (no zip header)"
        raise DataError(f"{path} {what}; write the dataset with np.savez(path, x=..., y=...)")
    _check_sizes(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except _CORRUPT as exc:
        raise DataError(f"{path} is not a readable .npz archive (truncated or corrupt?): {type(exc).__name__}: {exc}") from None
    arrays = {}
    with archive:
        for key in archive.files:
            try:
                value = archive[key]
            except ValueError as exc:
                if "allow_pickle" in str(exc):
                    raise DataError(
                        f"{path}: array {key!r} holds Python objects, which would have to be unpickled; "
                        f"the file is read with allow_pickle=False, so store plain numeric or string arrays"
                    ) from None
                raise DataError(f"{path}: array {key!r} is corrupt: {exc}") from None
            except _CORRUPT as exc:
                raise DataError(f"{path}: array {key!r} is truncated or corrupt: {type(exc).__name__}: {exc}") from None
            if not isinstance(value, np.ndarray):
                raise DataError(f"{path}: member {key!r} is not a .npy array")
            arrays[key] = value
    return arrays


def _check_sizes(path: Path) -> None:
    """Each member's .npy header against the bytes the member holds, and their total against
    the memory available, before numpy allocates an array of the size a header claims."""
    total = 0
    try:
        archive = zipfile.ZipFile(path)
    except _CORRUPT as exc:
        raise DataError(f"{path} is not a readable .npz archive (truncated or corrupt?): {type(exc).__name__}: {exc}") from None
    with archive:
        for info in archive.infolist():
            key = info.filename.removesuffix(".npy")
            try:
                with archive.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    if version not in ((1, 0), (2, 0)):
                        continue  # numpy reads (and checks) other versions itself
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(fh)
                    held = info.file_size - fh.tell()
            except _CORRUPT as exc:
                raise DataError(f"{path}: array {key!r} is truncated or corrupt: {type(exc).__name__}: {exc}") from None
            if dtype.hasobject:
                continue  # refused when read, without unpickling
            nbytes = math.prod(shape) * dtype.itemsize
            if held != nbytes:
                raise DataError(f"{path}: array {key!r} claims shape {list(shape)} ({nbytes} bytes of {dtype}) "
                                f"but holds {held} bytes")
            total += nbytes
    check_memory(total, f"{path} (its arrays)")


def _check_names(path: Path, arrays: dict) -> None:
    found = ", ".join(sorted(arrays)) or "none"
    for key in arrays:
        if key not in ARRAYS:
            raise DataError(f"{path}: unknown array {key!r}{suggest(key, ARRAYS)}; "
                            f"an npz dataset holds {', '.join(ARRAYS)}")
    for key, required in ARRAYS.items():
        if required and key not in arrays:
            raise DataError(f"{path}: array {key!r} is missing (the file holds: {found})")
    if ("x_test" in arrays) != ("y_test" in arrays):
        have, lack = ("x_test", "y_test") if "x_test" in arrays else ("y_test", "x_test")
        raise DataError(f"{path}: {have!r} needs {lack!r} too (a test split has images and labels)")


def _check_images(path: Path, key: str, x: np.ndarray) -> None:
    if x.dtype != np.uint8:
        raise DataError(f"{path}: {key!r} must be uint8 images (0..255); got dtype {x.dtype}")
    if x.ndim not in (3, 4):
        raise DataError(f"{path}: {key!r} must have shape [N, H, W] or [N, H, W, C]; got {list(x.shape)}")
    if x.ndim == 4 and x.shape[3] > 4 and 1 <= x.shape[1] <= 4:
        raise DataError(
            f"{path}: {key!r} of shape {list(x.shape)} looks channels-first; the file must hold "
            f"channels-last [N, H, W, C] images (np.moveaxis(x, 1, -1))"
        )
    if x.shape[0] == 0:
        raise DataError(f"{path}: {key!r} holds no images")
    if min(x.shape[1:]) < 1:
        raise DataError(f"{path}: {key!r} has an empty image dimension: {list(x.shape)}")


def _check_labels(path: Path, key: str, y: np.ndarray, n: int, images: str) -> None:
    if y.dtype.kind not in "iu":
        raise DataError(f"{path}: {key!r} must hold integer labels; got dtype {y.dtype}")
    if y.ndim != 1:
        raise DataError(f"{path}: {key!r} must have shape [N]; got {list(y.shape)}")
    if len(y) != n:
        raise DataError(f"{path}: {len(y)} labels in {key!r} for {n} images in {images!r}")


def _class_names(path: Path, arrays: dict) -> list[str] | None:
    if "classes" not in arrays:
        return None
    names = arrays["classes"]
    if names.dtype.kind not in "US" or names.ndim != 1 or len(names) == 0:
        raise DataError(f"{path}: 'classes' must be a non-empty 1-d string array; got {names.dtype} {list(names.shape)}")
    out = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names.tolist()]
    dupes = sorted({n for n in out if out.count(n) > 1})
    if dupes:
        raise DataError(f"{path}: 'classes' names {', '.join(map(repr, dupes))} more than once")
    return out


def _hflip(path: Path, arrays: dict) -> bool:
    if "hflip" not in arrays:
        return True
    flag = arrays["hflip"]
    if flag.dtype != np.bool_ or flag.size != 1:
        raise DataError(f"{path}: 'hflip' must be a single boolean; got {flag.dtype} {list(flag.shape)}")
    return bool(flag.reshape(()))


def _to_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W]`` / ``[N, H, W, C]`` -> ``[N, C, H, W]``."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.unsqueeze(1) if t.dim() == 3 else t.permute(0, 3, 1, 2).contiguous()


def load_npz(path: str | Path, *, name: str = "npz") -> ImageDataset:
    """Read and check an npz dataset file (the functional twin of the ``npz`` dataset)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"npz file not found: {path}")
    if not path.is_file():
        raise DataError(f"{path} is a folder; data.path must name the .npz file itself")
    arrays = _read_arrays(path)
    _check_names(path, arrays)
    x, y = arrays["x"], arrays["y"]
    _check_images(path, "x", x)
    _check_labels(path, "y", y, len(x), "x")
    test = "x_test" in arrays
    if test:
        tx, ty = arrays["x_test"], arrays["y_test"]
        _check_images(path, "x_test", tx)
        _check_labels(path, "y_test", ty, len(tx), "x_test")
        if tx.shape[1:] != x.shape[1:]:
            raise DataError(f"{path}: 'x_test' images are {list(tx.shape[1:])} but 'x' images are {list(x.shape[1:])}")
    classes = _class_names(path, arrays)
    labels = [("y", y)] + ([("y_test", ty)] if test else [])
    for key, lab in labels:
        lo = int(lab.min())
        if lo < 0:
            raise DataError(f"{path}: labels must be >= 0; {key!r} holds {lo}")
    if classes is None:
        key, hi = max(((k, int(lab.max())) for k, lab in labels), key=lambda kv: kv[1])
        n = sum(len(lab) for _, lab in labels)
        if hi >= n:  # checked before a list of hi + 1 names is built
            raise DataError(f"{path}: {key!r} holds label {hi}, which implies {hi + 1} classes for {n} images; "
                            f"labels must number the classes 0..K-1 (or name them in 'classes')")
        classes = [str(c) for c in range(hi + 1)]
    for key, lab in labels:
        hi = int(lab.max())
        if hi >= len(classes):
            raise DataError(f"{path}: {key!r} holds label {hi}, out of range for the {len(classes)} names in "
                            f"'classes' (labels must lie in [0, {len(classes) - 1}])")
    as_labels = lambda a: torch.from_numpy(a.astype(np.int64))  # noqa: E731
    return ImageDataset(
        _to_tensor(x), as_labels(y), classes,
        _to_tensor(tx) if test else None, as_labels(ty) if test else None,
        hflip=_hflip(path, arrays), name=name,
    )


@dataclass
class NpzOptions:
    """The npz dataset's own keys in ``[data]``."""

    path: str = field(default="", metadata={"help": "the .npz file (when empty, data.root is read instead)"})


def npz_dataset(options: NpzOptions, data) -> ImageDataset:
    """The registered loader: ``options`` are the dataset's own keys, ``data`` the run's ``[data]`` table."""
    root = getattr(data, "root", "")
    if options.path and root and options.path != root:
        raise ConfigError(
            f"data.path ({options.path!r}) and data.root ({root!r}) both name the file for data.name = 'npz'; "
            f"set data.path only"
        )
    path = options.path or root
    if not path:
        raise ConfigError("data.path must name the .npz file for data.name = 'npz'")
    return load_npz(path)


@hookimpl
def register_datasets(register):
    register("npz", npz_dataset, options=NpzOptions)
