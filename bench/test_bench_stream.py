"""Images/s of the streamed data pipeline against a plain DataLoader + Pillow loop.

The data: JPEG folders made from Fashion-MNIST's training images (``/usr/share/datasets/
fashion-mnist``), upscaled (bilinear) to 64 and 224 px, saved as RGB JPEGs (quality 90) in
one subfolder per class under ``$BATCHKIN_BENCH_STREAM_DIR`` (default
``/tmp/batchkin-bench-stream``; made once, reused).

One timed call is one training epoch of batch 64 delivered as normalised float batches on
the device (the CPU here): decode, random-resized crop (scale 0.08-1, ratio 3/4-4/3) to the
folder's size, horizontal flip, then ``(x / 255 - mean) / std``.

* ``stream`` — batchkin's path: :class:`batchkin.stream.StreamData` driven by the engine's
  :class:`~batchkin.data.ShuffleSampler` through ``steps(state)`` and ``batch(...)``
  (whole-step DataLoader items, counter-based per-sample draws, uint8 to the device,
  normalisation there);
* ``plain`` — the baseline a user writes: a map-style ``Dataset`` whose ``__getitem__``
  opens the file with Pillow, converts to RGB, crops with torchvision's random-resized
  crop parameters (the same function, drawn from the worker's torch RNG), resizes,
  flips, and returns a CHW tensor; ``torch.utils.data.DataLoader(shuffle=True)`` with the
  default collate; the same normalisation after.

Both use the same worker count (0, 1, 2) and persistent workers. ``decode_us`` is the cost
of opening and decoding one file (no transform), ``transform_us`` decode plus the crop,
resize and flip, both in this process, averaged over 200 files.

    pytest bench/test_bench_stream.py --benchmark-only        # pytest-benchmark, small folders
    python bench/test_bench_stream.py [--rounds 5] [--quick] [--write]

The script times the two implementations interleaved (:func:`batchkin.bench.interleave`:
alternating within every round, the median of per-round ratios), prints a table and the rows
as JSON on its last line; ``--write`` stores them in ``bench/results/<device>/stream.{json,md}``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

SIZES = {64: 3000, 224: 2000}  # image side -> images in the folder
QUICK_SIZES = {64: 512, 224: 256}
WORKERS = (0, 1, 2)
BATCH = 64
MEAN, STD = [0.29] * 3, [0.35] * 3
ROOT = Path(os.environ.get("BATCHKIN_BENCH_STREAM_DIR", "/tmp/batchkin-bench-stream"))


def jpeg_folder(side: int, n: int) -> Path:
    """``n`` Fashion-MNIST training images as RGB JPEGs of ``side`` px, one folder per class."""
    from PIL import Image

    from batchkin.data import FASHION_MNIST_ROOT, load_idx_folder

    root = ROOT / f"fmnist{side}-{n}"
    done = root / ".complete"
    if done.is_file():
        return root
    ds = load_idx_folder(FASHION_MNIST_ROOT, "fashion_mnist")
    for i in range(n):
        label = int(ds.y[i])
        folder = root / f"c{label}"
        folder.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(ds.x[i, 0].numpy()).resize((side, side), Image.BILINEAR).convert("RGB")
        im.save(folder / f"{i:05d}.jpg", quality=90)
    done.write_text(str(n))
    return root


# ------------------------------------------------------------------------------ the two pipelines


class PlainDataset(torch.utils.data.Dataset):
    """The baseline's dataset: one file per ``__getitem__``, decoded and augmented with Pillow."""

    def __init__(self, paths, labels, side: int):
        self.paths, self.labels, self.side = paths, labels, side

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        from batchkin.transforms import UNIFORMS_PER_SAMPLE, random_resized_crop_box

        image = Image.open(self.paths[i]).convert("RGB")
        left, top, w, h = random_resized_crop_box(image.width, image.height, (0.08, 1.0), (3 / 4, 4 / 3),
                                                  torch.rand(UNIFORMS_PER_SAMPLE).tolist())
        image = image.crop((left, top, left + w, top + h)).resize((self.side, self.side), Image.BILINEAR)
        if torch.rand(()) < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(image)).permute(2, 0, 1), self.labels[i]


def plain_epoch_fn(root: Path, side: int, workers: int):
    from batchkin.data import list_image_folder

    paths, labels, _ = list_image_folder(root)
    loader = torch.utils.data.DataLoader(
        PlainDataset([str(p) for p in paths], labels, side), batch_size=BATCH, shuffle=True, drop_last=True,
        num_workers=workers, persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)

    def epoch() -> int:
        n = 0
        for x, y in loader:
            x = (x.float() / 255.0 - mean) / std
            n += len(y)
        return n

    return epoch


def stream_epoch_fn(root: Path, side: int, workers: int):
    from batchkin.config import DataConfig
    from batchkin.data import ShuffleSampler, Split, Splits
    from batchkin.stream import StreamData, streamed_image_folder

    cfg = DataConfig(name="imagefolder", root=str(root), storage="stream", image_size=[side, side], num_workers=workers)
    ds = streamed_image_folder(cfg)
    split = Split(ds.x, ds.y)
    splits = Splits(split, split, split, ds.classes, True, MEAN, STD)
    data = StreamData(split, splits, torch.device("cpu"))
    state = SimpleNamespace(
        config=SimpleNamespace(seed=0, data=SimpleNamespace(augment=True, batch_size=BATCH)),
        sampler=ShuffleSampler(len(split), BATCH, 0), step=0, epoch=0, rank=0, world_size=1, splits=splits,
        hooks=SimpleNamespace(methods={}), epoch_metrics={})

    def epoch() -> int:
        state.epoch += 1
        state.sampler.set_epoch(state.epoch)
        n = 0
        for indices in data.steps(state):
            x, y = data.batch(indices[""], augment=True, padding=0, hflip=True, gen=None)
            n += len(y)
            state.step += 1
        return n

    return epoch


IMPLS = {"plain": plain_epoch_fn, "stream": stream_epoch_fn}


def decode_costs(root: Path, side: int, n: int = 200) -> dict:
    """Microseconds per image: decoding alone, and decoding + crop + resize + flip (this process)."""
    from batchkin.data import list_image_folder
    from batchkin.transforms import UNIFORMS_PER_SAMPLE, ImageTransform, open_image

    paths = list_image_folder(root)[0][:n]
    t0 = time.perf_counter()
    for p in paths:
        open_image(p)
    decode = time.perf_counter() - t0
    transform = ImageTransform("train", "RGB", (side, side), side)
    u = np.random.default_rng(0).random((len(paths), UNIFORMS_PER_SAMPLE))
    t0 = time.perf_counter()
    for p, row in zip(paths, u):
        transform(open_image(p), row)
    full = time.perf_counter() - t0
    return {"decode_us": round(1e6 * decode / len(paths), 1), "transform_us": round(1e6 * full / len(paths), 1)}


# ------------------------------------------------------------------------------ pytest-benchmark


def _quick() -> bool:
    return os.environ.get("BATCHKIN_BENCH_QUICK", "1") != "0"


_FNS: dict = {}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("side", list(SIZES))
def test_stream_epoch(benchmark, side, workers, impl):
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.fail("the benchmark reads Fashion-MNIST from /usr/share/datasets/fashion-mnist (dataset-fashion-mnist)")
    n = (QUICK_SIZES if _quick() else SIZES)[side]
    root = jpeg_folder(side, n)
    key = (side, workers, impl)
    if key not in _FNS:
        _FNS[key] = IMPLS[impl](root, side, workers)
    fn = _FNS[key]
    images = fn()  # warm-up: starts the persistent workers
    benchmark.group = f"stream {side}px {workers} workers"
    benchmark.extra_info.update({"impl": impl, "images": images, "baseline": "plain", **decode_costs(root, side, 50)})
    benchmark.pedantic(fn, rounds=3, iterations=1)


# ------------------------------------------------------------------------------ the interleaved script


def interleaved(rounds: int, quick: bool = False) -> list[dict]:
    from batchkin.bench import interleave

    rows = []
    for side, n in (QUICK_SIZES if quick else SIZES).items():
        root = jpeg_folder(side, n)
        costs = decode_costs(root, side)
        for workers in WORKERS:
            fns = {name: make(root, side, workers) for name, make in IMPLS.items()}
            images = {name: fn() for name, fn in fns.items()}  # warm-up, and the images an epoch delivers
            assert images["plain"] == images["stream"], images
            res = interleave(fns, rounds, baseline="plain")
            rows.append({
                "side": side, "images": n, "workers": workers, "batch": BATCH, "epoch_images": images["stream"],
                **{f"{k}_images_per_s": round(images[k] / v, 1) for k, v in res["median_s"].items()},
                "stream_vs_plain": round(res["median_ratio"]["stream"], 3), "ratios": res["ratios"]["stream"],
                **costs,
            })
            del fns
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["### Streamed data pipeline", "",
             f"Device: {meta['device']}; torch {meta['torch']}, Pillow {meta['pillow']}; {meta['date']}. Command: "
             f"`{meta['command']}` (OMP_NUM_THREADS={meta['omp_threads']}). One epoch of batch {BATCH} per call: "
             "decode, random-resized crop, flip, normalise; `stream` is batchkin's StreamData driven by the engine's "
             "sampler, `plain` a DataLoader over a Pillow `Dataset` with the default collate, both with persistent "
             f"workers. The two alternate within each of {meta['rounds']} rounds; the ratio is the median of the "
             "per-round ratios plain time / stream time (above 1: the streamed path is faster). `decode` is opening "
             "and decoding one JPEG, `+ transform` adds crop, resize and flip (one process).", "",
             "| image | files | workers | plain (img/s) | stream (img/s) | stream vs plain | decode (us/img) | "
             "decode + transform (us/img) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['side']}px | {r['images']} | {r['workers']} | {r['plain_images_per_s']:.0f} | "
                     f"{r['stream_images_per_s']:.0f} | {r['stream_vs_plain']:.2f}x | {r['decode_us']:.0f} | "
                     f"{r['transform_us']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import argparse
    import json
    import platform

    import PIL

    ap = argparse.ArgumentParser(description="streamed pipeline vs a plain DataLoader + Pillow, interleaved; prints a "
                                 "table, then the rows as JSON on the last line")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="small folders (512 and 256 images)")
    ap.add_argument("--write", action="store_true", help="store bench/results/<device>/stream.{json,md} and "
                    "regenerate the README's performance section")
    args = ap.parse_args()
    from batchkin.bench import device_name, update_readme

    rows = interleaved(args.rounds, args.quick)
    meta = {"device": device_name("cpu"), "torch": str(torch.__version__), "pillow": PIL.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds,
            "omp_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
            "command": "python bench/test_bench_stream.py " + " ".join(sys.argv[1:])}
    md = markdown(rows, meta)
    print(md)
    if args.write:
        out = Path(__file__).resolve().parent / "results" / meta["device"]
        out.mkdir(parents=True, exist_ok=True)
        (out / "stream.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        (out / "stream.md").write_text(md)
        update_readme(Path(__file__).resolve().parents[1])
    print(json.dumps(rows))
