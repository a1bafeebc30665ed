"""Builders of hostile input files for the reliability tests (each a few bytes to a few KB)."""

from __future__ import annotations

import io
import struct
import textwrap
import zlib
from pathlib import Path

import numpy as np

PLUGIN_PREFIX = "from batchkin.hookspecs import hookimpl\nfrom batchkin.plugin import Method\n"


def idx_bytes(shape, payload: bytes, code: int = 0x08) -> bytes:
    """An IDX file: magic, type code, dimensions (big-endian uint32) and the payload as given."""
    return struct.pack(f">BBBB{len(shape)}I", 0, 0, code, len(shape), *shape) + payload


def idx_folder(root: Path, images: np.ndarray, labels: np.ndarray, label_code: int = 0x08,
               test: tuple[np.ndarray, np.ndarray] | None = None) -> Path:
    """An MNIST-format folder; the test split repeats the training split unless given."""
    root.mkdir(parents=True)
    dtype = {0x08: np.uint8, 0x0C: ">i4", 0x0D: ">f4"}[label_code]
    tx, ty = test if test is not None else (images, labels)
    for prefix, x, y in (("train", images, labels), ("t10k", tx, ty)):
        (root / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(x.shape, x.astype(np.uint8).tobytes()))
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(y.shape, y.astype(dtype).tobytes(), label_code))
    return root


def small_idx_set(n: int = 24, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 6, 6), dtype=np.uint8), np.arange(n) % classes


def png(size: tuple[int, int], mode: str = "L", value: int = 128) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, value if mode == "L" else (value, value // 2, 255 - value)).save(buf, format="PNG")
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 grey PNG whose IHDR chunk (CRC recomputed) claims ``width x height`` pixels."""
    raw = png((1, 1))
    start = 8 + 8  # signature, then the IHDR chunk's length and type
    ihdr = bytearray(raw[start:start + 13])
    ihdr[0:8] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return raw[:start] + bytes(ihdr) + crc + raw[start + 13 + 4:]


def image_folder(root: Path, files: dict[str, bytes]) -> Path:
    """``{"class/name.png": bytes}`` written under ``root``."""
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def plugin(folder: Path, stem: str, source: str) -> Path:
    """A ``--plugin`` file (hookimpl and Method imported) with ``source`` dedented."""
    path = Path(folder) / f"{stem}.py"
    path.write_text(PLUGIN_PREFIX + textwrap.dedent(source))
    return path
