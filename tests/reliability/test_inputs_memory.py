"""Inputs that would exhaust memory from a few bytes: every size read from a file or the config
is checked against what the file and the machine can hold before anything is allocated,
with one line naming the file or the key."""

from __future__ import annotations

import gzip
import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hostile import idx_bytes, idx_folder, image_folder, png, png_claiming, small_idx_set

from batchkin import data
from batchkin.config import DataConfig
from batchkin.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[2]
NPZ_PLUGIN = ROOT / "examples" / "batchkin-npz-dataset" / "src" / "batchkin_npz_dataset" / "plugin.py"

TRAIN = ["train", "--quiet", "--set", "device=cpu", "--set", "model.name=tiny", "--set", "epochs=1"]


def _data(name: str, root) -> list[str]:
    return ["--set", f"data.name={name}", "--set", f"data.root={root}"]


@pytest.fixture
def small_memory(monkeypatch):
    """The machine has only 64 KiB available (as far as the loaders can tell)."""
    monkeypatch.setattr(data, "available_memory", lambda: 64 * 1024)


# ------------------------------------------------------------------------------ labels that make the class count explode


def test_an_idx_label_of_two_billion_is_refused_before_any_class_list(user_error, tmp_path):
    x, y = small_idx_set()
    y = y.copy()
    y[5] = 2_000_000_000
    root = idx_folder(tmp_path / "idx", x, y, label_code=0x0C)
    out = tmp_path / "run"
    user_error([*TRAIN, *_data("idx", root), "--out", out],
               str(root / "train-labels-idx1-ubyte"), "label 2000000000", unchanged=[root, out])


def test_an_npz_label_of_1e12_is_refused_naming_the_array(user_error, tmp_path):
    """The example dataset plugin follows the same rule: the class count a label implies may
    not exceed the images the file holds (its own tests check its .npy headers against the
    bytes each member holds)."""
    path = tmp_path / "d.npz"
    y = np.arange(20, dtype=np.int64) % 2
    y[3] = 10**12
    np.savez(path, x=np.zeros((20, 4, 4), np.uint8), y=y)
    out = tmp_path / "run"
    user_error([*TRAIN, "--plugin", NPZ_PLUGIN, "--set", "data.name=npz", "--set", f"data.path={path}", "--out", out],
               str(path), "'y' holds label 1000000000000", unchanged=[path, out])


# ------------------------------------------------------------------------------ pickles built from shared references


def test_a_cifar_labels_list_of_shared_references_is_refused_before_numpy(user_error, tmp_path):
    """Ten labels, each the same 100x100x100 nested list: a few hundred bytes of pickle that
    np.asarray would turn into ten million int64s."""
    inner = [0] * 100
    nested = [[inner] * 100] * 100
    batch = {b"data": np.zeros((10, 3072), np.uint8), b"labels": [nested] * 10}
    blob = pickle.dumps(batch, protocol=2)
    assert len(blob) < 50_000
    root = tmp_path / "cifar"
    root.mkdir()
    (root / "data_batch_1").write_bytes(blob)
    out = tmp_path / "run"
    user_error([*TRAIN, *_data("cifar10", root), "--out", out],
               str(root / "data_batch_1"), "'labels' must list one integer label per image", unchanged=[root, out])
    # and nothing of the size the references describe is ever allocated
    tracemalloc.start()
    try:
        with pytest.raises(DataError):
            data._cifar_arrays({"data": batch[b"data"], "labels": [nested] * 10}, root / "data_batch_1", "labels", 10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000  # np.asarray would need 80 MB


def test_cifar_class_names_of_shared_references_are_not_stringified(tmp_path):
    """A meta file whose names are huge nested lists keeps the numbered class names."""
    good = {b"data": np.zeros((10, 3072), np.uint8), b"labels": list(range(10))}
    root = tmp_path / "cifar"
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (root / name).write_bytes(pickle.dumps(good, protocol=2))
    inner = [[0] * 100] * 100
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [[inner] * 100] * 10}, protocol=2))
    ds = data.load_cifar(DataConfig(name="cifar10", root=str(root)), 10)
    assert ds.classes == [str(i) for i in range(10)] and len(ds.y) == 50


# ------------------------------------------------------------------------------ image headers and sizes


def test_a_100_byte_png_claiming_20000x20000_pixels_is_refused(user_error, tmp_path):
    bomb = png_claiming(20000, 20000)
    assert len(bomb) < 100
    root = image_folder(tmp_path / "images", {"a/bomb.png": bomb, "b/ok.png": png((6, 6))})
    out = tmp_path / "run"
    user_error([*TRAIN, *_data("imagefolder", root), "--out", out],
               str(root / "a" / "bomb.png"), "decompression bomb", unchanged=[root, out])


def test_an_image_header_is_checked_against_memory_before_decoding(small_memory, tmp_path):
    root = image_folder(tmp_path / "images", {"a/big.png": png((200, 200)), "b/ok.png": png((6, 6))})
    with pytest.raises(DataError, match=r"big\.png \(200x200 pixels\) needs 156\.2 KiB of memory; this machine has 64\.0 KiB"):
        data.load_image_folder(DataConfig(name="imagefolder", root=str(root)))


def test_image_size_beyond_pillows_limit_is_refused(user_error, tmp_path):
    root = image_folder(tmp_path / "images", {"a/x.png": png((6, 6)), "b/y.png": png((6, 6))})
    out = tmp_path / "run"
    user_error([*TRAIN, *_data("imagefolder", root), "--set", "data.image_size=[100000,100000]", "--out", out],
               "data.image_size = [100000, 100000]", "decompression-bomb limit", unchanged=[root, out])


def test_image_size_times_the_file_count_is_checked_before_the_first_image(small_memory, tmp_path, monkeypatch):
    root = image_folder(tmp_path / "images", {f"{c}/{i}.png": png((6, 6)) for c in "ab" for i in range(4)})
    monkeypatch.setattr(data, "_read_image", lambda *a: pytest.fail("an image was decoded"))
    with pytest.raises(ConfigError, match=r"data.image_size = \[64, 64\] for the 8 images .* needs 96\.0 KiB"):
        data.load_image_folder(DataConfig(name="imagefolder", root=str(root), image_size=[64, 64]))


def test_a_folder_of_images_is_checked_against_memory_after_the_first_image(small_memory, tmp_path):
    root = image_folder(tmp_path / "images", {f"{c}/{i:03d}.png": png((20, 20)) for c in "ab" for i in range(100)})
    with pytest.raises(DataError, match=r"the 200 images of .* \(20x20x1\) needs 78\.1 KiB"):
        data.load_image_folder(DataConfig(name="imagefolder", root=str(root)))


# ------------------------------------------------------------------------------ sizes from the config and IDX headers


def test_a_synthetic_set_beyond_any_machine_is_refused(user_error, tmp_path):
    out = tmp_path / "run"
    user_error([*TRAIN, "--set", "data.name=synthetic", "--set", "data.synthetic_per_class=1000000000000",
                "--out", out], "data.synthetic_per_class", "needs", "of memory", unchanged=[out])


def test_the_synthetic_set_is_checked_against_the_memory_available(small_memory):
    cfg = DataConfig(synthetic_classes=4, synthetic_per_class=100, synthetic_shape=[3, 8, 8])
    with pytest.raises(ConfigError, match=r"4 classes x 100 images of 3x8x8.* needs 378\.1 KiB"):
        data.load_synthetic(cfg)
    small = data.load_synthetic(DataConfig(synthetic_classes=2, synthetic_per_class=5, synthetic_shape=[1, 4, 4]))
    assert small.x.shape == (10, 1, 4, 4)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_an_idx_header_is_checked_against_memory_before_the_data_is_read(small_memory, tmp_path, gz):
    path = tmp_path / ("x-idx3-ubyte.gz" if gz else "x-idx3-ubyte")
    blob = idx_bytes((100, 30, 30), bytes(90_000))
    path.write_bytes(gzip.compress(blob) if gz else blob)
    with pytest.raises(DataError, match=r"x-idx3-ubyte(\.gz)? \(shape \(100, 30, 30\)\) needs 87\.9 KiB of memory"):
        data.read_idx(path)


def test_a_gz_idx_whose_header_lies_reads_no_more_than_the_file_holds(tmp_path, monkeypatch):
    """The header claims a billion images; the stream holds 36 bytes: the reader stops at the
    end of the stream (it never allocates the claimed size) and says so."""
    monkeypatch.setattr(data, "available_memory", lambda: None)  # no limit known: only the file bounds the read
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes((10**9, 6, 6), bytes(36))))
    with pytest.raises(DataError, match=r"truncated or corrupt: 36 data bytes, expected 36000000000"):
        data.read_idx(path)


def test_available_memory_reads_the_system(monkeypatch):
    avail = data.available_memory()
    assert avail is None or avail > 0
    with pytest.raises(DataError, match="needs 2.0 GiB of memory; this machine has 1.0 GiB available"):
        monkeypatch.setattr(data, "available_memory", lambda: 2**30)
        data.check_memory(2**31, "the thing")


def test_model_options_beyond_memory_are_refused_naming_the_model(user_error, tmp_path):
    out = tmp_path / "run"
    user_error([*TRAIN, "--set", "data.name=synthetic", "--set", f"model.width={10**11}", "--out", out],
               "model 'tiny' (builtin) with options {'name': 'tiny', 'width': 100000000000} does not fit in the memory "
               "of cpu", unchanged=[out])
