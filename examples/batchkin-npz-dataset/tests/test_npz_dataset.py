"""The npz dataset plugin's own tests, written with batchkin.testing."""

from pathlib import Path

import numpy as np
import pytest
import torch

from batchkin.config import DataConfig
from batchkin.errors import ConfigError, DataError
from batchkin.plugin import Plugins
from batchkin.testing import run_plugin, tiny_config
from batchkin.trainer import prepare, resolved_config
from batchkin_npz_dataset import NpzOptions, load_npz, plugin


def _images(rng, n, shape):
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _write(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ------------------------------------------------------------------------------ loading


def test_grayscale_images_load_exactly(tmp_path, rng):
    x = _images(rng, 12, (5, 7))
    y = np.array([0, 1, 2] * 4, dtype=np.int32)
    ds = load_npz(_write(tmp_path / "d.npz", x=x, y=y))
    assert ds.x.dtype == torch.uint8 and tuple(ds.x.shape) == (12, 1, 5, 7)
    assert np.array_equal(ds.x[:, 0].numpy(), x)
    assert ds.y.dtype == torch.int64 and ds.y.tolist() == y.tolist()
    assert ds.classes == ["0", "1", "2"]
    assert ds.test_x is None and ds.test_y is None
    assert ds.hflip is True and ds.name == "npz"


def test_channels_last_images_with_a_test_split_names_and_flip_flag(tmp_path, rng):
    x, tx = _images(rng, 9, (4, 6, 3)), _images(rng, 5, (4, 6, 3))
    y, ty = np.array([2, 0, 1, 1, 0, 2, 2, 1, 0], np.uint8), np.array([1, 0, 2, 2, 1], np.int64)
    path = _write(tmp_path / "rgb.npz", x=x, y=y, x_test=tx, y_test=ty,
                  classes=np.array(["cat", "dog", "emu"]), hflip=np.array(False))
    ds = load_npz(path)
    assert tuple(ds.x.shape) == (9, 3, 4, 6) and ds.x.is_contiguous()
    # pixel (n, h, w, c) of the file is pixel (n, c, h, w) of the dataset
    assert int(ds.x[4, 2, 3, 5]) == int(x[4, 3, 5, 2])
    assert np.array_equal(ds.x.permute(0, 2, 3, 1).numpy(), x)
    assert np.array_equal(ds.test_x.permute(0, 2, 3, 1).numpy(), tx)
    assert ds.y.tolist() == [2, 0, 1, 1, 0, 2, 2, 1, 0] and ds.test_y.tolist() == [1, 0, 2, 2, 1]
    assert ds.classes == ["cat", "dog", "emu"] and ds.hflip is False


def test_class_count_spans_the_test_labels_and_compressed_files_load(tmp_path, rng):
    x = _images(rng, 4, (3, 3))
    np.savez_compressed(tmp_path / "c.npz", x=x, y=np.array([0, 1, 0, 1]), x_test=x[:2], y_test=np.array([3, 0]))
    ds = load_npz(tmp_path / "c.npz")
    assert ds.classes == ["0", "1", "2", "3"]
    assert np.array_equal(ds.x[:, 0].numpy(), x)


def _plugins():
    return Plugins(autoload=False, extra_modules=[plugin])


def test_the_dataset_is_registered_with_its_own_path_option():
    entry = _plugins().dataset("npz")
    assert entry.origin == f"module {plugin.__name__}"
    assert entry.options is NpzOptions and NpzOptions().path == ""
    assert entry.obj.loader is plugin.npz_dataset


def test_the_loader_gets_its_parsed_options_and_the_data_table(tmp_path, rng):
    path = _write(tmp_path / "d.npz", x=_images(rng, 6, (4, 4)), y=np.arange(6) % 2)
    # called directly, as the engine calls it: loader(options, data=data_config)
    ds = plugin.npz_dataset(NpzOptions(path=str(path)), data=DataConfig(name="npz"))
    assert tuple(ds.x.shape) == (6, 1, 4, 4) and ds.classes == ["0", "1"]
    # through the registry: the [data] table's own keys are checked and parsed first
    data = DataConfig(name="npz")
    data.options = {"path": str(path)}
    ds = _plugins().dataset("npz").obj(data)
    assert tuple(ds.x.shape) == (6, 1, 4, 4)


def test_data_root_is_the_fallback_for_an_empty_path(tmp_path, rng):
    path = _write(tmp_path / "d.npz", x=_images(rng, 6, (4, 4)), y=np.arange(6) % 3)
    ds = plugin.npz_dataset(NpzOptions(), data=DataConfig(name="npz", root=str(path)))
    assert ds.classes == ["0", "1", "2"]
    same = plugin.npz_dataset(NpzOptions(path=str(path)), data=DataConfig(name="npz", root=str(path)))
    assert same.classes == ["0", "1", "2"]
    with pytest.raises(ConfigError, match=r"data\.path \('a\.npz'\) and data\.root \('b\.npz'\) both name the file.*set data\.path only"):
        plugin.npz_dataset(NpzOptions(path="a.npz"), data=DataConfig(name="npz", root="b.npz"))
    with pytest.raises(ConfigError, match=r"data\.path must name the \.npz file for data\.name = 'npz'"):
        plugin.npz_dataset(NpzOptions(), data=DataConfig(name="npz"))


@pytest.mark.parametrize("data, message", [
    ({"pth": "x.npz"}, r"unknown config key data\.pth \(did you mean 'path'\?\); valid \[data\] keys for "
                       r"data\.name = 'npz': path \(the dataset's own\) and the engine's name, root, "),
    ({"path": 3}, r"data\.path must be a string, got int 3"),
    ({"path": ["a.npz"]}, r"data\.path must be a string, got list"),
])
def test_the_engine_checks_the_path_option(data, message):
    raw = tiny_config(data={"name": "npz", **data})
    with pytest.raises(ConfigError, match=message):
        prepare(raw, _plugins())


def test_path_is_refused_for_another_dataset(tmp_path):
    raw = tiny_config(data={"path": str(tmp_path / "d.npz")})  # data.name stays "synthetic"
    with pytest.raises(ConfigError, match=r"data\.path is an option of dataset 'npz', not of the selected "
                                          r"data\.name = 'synthetic' \(which has no options of its own\)"):
        prepare(raw, _plugins())


def test_the_resolved_config_keeps_path_in_the_data_table(tmp_path, rng):
    path = _write(tmp_path / "d.npz", x=_images(rng, 40, (8, 8)), y=np.arange(40) % 4)
    state = prepare(tiny_config(data={"name": "npz", "path": str(path)}), _plugins())
    data = resolved_config(state)["data"]
    assert data["name"] == "npz" and data["path"] == str(path) and data["root"] == ""
    assert "options" not in data


# ------------------------------------------------------------------------------ errors


def _good(rng):
    return {"x": _images(rng, 6, (4, 4)), "y": np.array([0, 1, 2, 0, 1, 2])}


BAD = {
    "missing x": (lambda a: a.pop("x"), r"array 'x' is missing \(the file holds: y\)"),
    "missing y": (lambda a: a.pop("y"), r"array 'y' is missing \(the file holds: x\)"),
    "test images without labels": (lambda a: a.update(x_test=a["x"]), r"'x_test' needs 'y_test' too"),
    "test labels without images": (lambda a: a.update(y_test=a["y"]), r"'y_test' needs 'x_test' too"),
    "unknown array": (lambda a: a.update(x_tset=a["x"]), r"unknown array 'x_tset' \(did you mean 'x_test'\?\)"),
    "float images": (lambda a: a.update(x=a["x"].astype(np.float32)), r"'x' must be uint8 images .*got dtype float32"),
    "int16 images": (lambda a: a.update(x=a["x"].astype(np.int16)), r"'x' must be uint8 images .*got dtype int16"),
    "flat images": (lambda a: a.update(x=a["x"].reshape(6, 16)), r"'x' must have shape \[N, H, W\] or \[N, H, W, C\]; got \[6, 16\]"),
    "5-d images": (lambda a: a.update(x=a["x"].reshape(6, 2, 2, 2, 2)), r"got \[6, 2, 2, 2, 2\]"),
    "channels first": (lambda a: a.update(x=np.zeros((6, 3, 8, 8), np.uint8)), r"looks channels-first.*np\.moveaxis"),
    "no images": (lambda a: a.update(x=a["x"][:0], y=a["y"][:0]), r"'x' holds no images"),
    "empty image": (lambda a: a.update(x=np.zeros((6, 0, 4), np.uint8)), r"'x' has an empty image dimension"),
    "float labels": (lambda a: a.update(y=a["y"].astype(np.float64)), r"'y' must hold integer labels; got dtype float64"),
    "bool labels": (lambda a: a.update(y=a["y"] > 0), r"'y' must hold integer labels; got dtype bool"),
    "string labels": (lambda a: a.update(y=a["y"].astype(str)), r"'y' must hold integer labels"),
    "2-d labels": (lambda a: a.update(y=a["y"][:, None]), r"'y' must have shape \[N\]; got \[6, 1\]"),
    "fewer labels": (lambda a: a.update(y=a["y"][:5]), r"5 labels in 'y' for 6 images in 'x'"),
    "more test labels": (lambda a: a.update(x_test=a["x"][:2], y_test=a["y"][:3]), r"3 labels in 'y_test' for 2 images in 'x_test'"),
    "test size differs": (lambda a: a.update(x_test=np.zeros((2, 4, 5), np.uint8), y_test=a["y"][:2]),
                          r"'x_test' images are \[4, 5\] but 'x' images are \[4, 4\]"),
    "negative label": (lambda a: a["y"].__setitem__(3, -1), r"labels must be >= 0; 'y' holds -1"),
    "negative test label": (lambda a: a.update(x_test=a["x"][:2], y_test=np.array([0, -2])), r"'y_test' holds -2"),
    "label beyond classes": (lambda a: a.update(classes=np.array(["a", "b"])),
                             r"'y' holds label 2, out of range for the 2 names in 'classes' \(labels must lie in \[0, 1\]\)"),
    "test label beyond classes": (lambda a: a.update(classes=np.array(["a", "b", "c"]), x_test=a["x"][:1], y_test=np.array([7])),
                                  r"'y_test' holds label 7, out of range for the 3 names"),
    "label of 1e12 without names": (lambda a: a["y"].__setitem__(2, 10**12),
                                    r"'y' holds label 1000000000000, which implies 1000000000001 classes for 6 images"),
    "numeric class names": (lambda a: a.update(classes=np.arange(3)), r"'classes' must be a non-empty 1-d string array"),
    "duplicate class names": (lambda a: a.update(classes=np.array(["a", "b", "a"])), r"'classes' names 'a' more than once"),
    "non-bool flip flag": (lambda a: a.update(hflip=np.array(1)), r"'hflip' must be a single boolean"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_contents_are_refused_naming_the_array(tmp_path, rng, case):
    change, message = BAD[case]
    arrays = _good(rng)
    change(arrays)
    path = _write(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message) as info:
        load_npz(path)
    assert str(path) in str(info.value)


def test_the_unchanged_good_file_loads(tmp_path, rng):
    # the baseline the error cases above each break in one way
    ds = load_npz(_write(tmp_path / "good.npz", **_good(rng)))
    assert ds.classes == ["0", "1", "2"] and len(ds.y) == 6


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DataError, match=r"npz file not found: .*nope\.npz"):
        load_npz(tmp_path / "nope.npz")
    with pytest.raises(DataError, match=r"is a folder; data\.path must name the \.npz file itself"):
        load_npz(tmp_path)


@pytest.mark.parametrize("cut", [0.5, 0.9, 20])
def test_truncated_file(tmp_path, rng, cut):
    good = _write(tmp_path / "good.npz", **_good(rng)).read_bytes()
    keep = int(len(good) * cut) if cut < 1 else cut
    (tmp_path / "cut.npz").write_bytes(good[:keep])
    with pytest.raises(DataError, match=r"cut\.npz is not a readable \.npz archive \(truncated or corrupt\?\)"):
        load_npz(tmp_path / "cut.npz")


def test_an_array_header_claiming_more_than_the_member_holds(tmp_path):
    """The .npy header of 'x' claims 10**11 images (1.6 TB) over 96 bytes: refused from the
    header, before numpy allocates the claimed size."""
    import zipfile

    path = tmp_path / "lies.npz"
    with zipfile.ZipFile(path, "w") as zf:
        with zf.open("x.npy", "w") as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": "|u1", "fortran_order": False, "shape": (10**11, 4, 4)})
            fh.write(bytes(96))
        with zf.open("y.npy", "w") as fh:
            np.lib.format.write_array(fh, np.zeros(6, np.int64))
    with pytest.raises(DataError, match=r"lies\.npz: array 'x' claims shape \[100000000000, 4, 4\] \(1600000000000 "
                                        r"bytes of uint8\) but holds 96 bytes"):
        load_npz(path)


def test_corrupt_array_data_is_caught_by_the_checksum(tmp_path, rng):
    raw = bytearray(_write(tmp_path / "good.npz", **_good(rng)).read_bytes())
    start = raw.index(b"\x93NUMPY")  # the first member's .npy header, inside the zip
    raw[start + 130 : start + 140] = bytes(10)  # overwrite pixel bytes; the zip directory stays intact
    (tmp_path / "flipped.npz").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"array 'x' is truncated or corrupt: BadZipFile"):
        load_npz(tmp_path / "flipped.npz")


@pytest.mark.parametrize("content,message", [
    (b"", r"is empty"),
    (b"x,y\n1,2\n", r"is not an \.npz archive \(no zip header\)"),
    (b"\x80\x04\x95" + bytes(20), r"is not an \.npz archive \(no zip header\)"),  # a pickle
])
def test_files_that_are_not_archives(tmp_path, content, message):
    (tmp_path / "f.npz").write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_npz(tmp_path / "f.npz")


def test_a_bare_npy_file_is_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(DataError, match=r"holds a single \.npy array, not an \.npz archive"):
        load_npz(tmp_path / "x.npy")


class _Touch:
    """Unpickling this creates a file: the test below checks that never happens."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_object_arrays_are_refused_without_unpickling(tmp_path, rng):
    marker = tmp_path / "unpickled"
    arrays = _good(rng)
    arrays["y"] = np.array([_Touch(marker)] * 6, dtype=object)
    np.savez(tmp_path / "obj.npz", **arrays)  # numpy pickles object arrays when saving
    with pytest.raises(DataError, match=r"array 'y' holds Python objects.*allow_pickle=False"):
        load_npz(tmp_path / "obj.npz")
    assert not marker.exists()


# ------------------------------------------------------------------------------ training


def test_trains_two_steps_with_ce_through_the_engine(tmp_path, rng, batchkin_config):
    x, tx = _images(rng, 60, (6, 6, 3)), _images(rng, 9, (6, 6, 3))
    y, ty = np.arange(60) % 3, np.array([0, 1, 2] * 3)
    path = _write(tmp_path / "d.npz", x=x, y=y, x_test=tx, y_test=ty, classes=np.array(["a", "b", "c"]))
    batchkin_config["data"].update(name="npz", path=str(path), batch_size=8, val_fraction=0.2)
    state = run_plugin(["ce"], config=batchkin_config, plugin_modules=[plugin])
    assert state.step == 2 and set(state.loss_terms) == {"ce"}
    splits = state.splits
    assert splits.classes == ["a", "b", "c"] and splits.image_shape == (3, 6, 6)
    # the file's test split is kept as it is; train + val share out the training images, stratified
    assert np.array_equal(splits.test.x.permute(0, 2, 3, 1).numpy(), tx) and splits.test.y.tolist() == ty.tolist()
    assert len(splits.train) + len(splits.val) == 60 and len(splits.val) == 12
    assert torch.bincount(splits.val.y).tolist() == [4, 4, 4]
    assert state.unwrapped_model.classifier.out_features == 3


def test_without_a_test_split_the_engine_holds_one_out(tmp_path, rng):
    path = _write(tmp_path / "d.npz", x=_images(rng, 40, (8, 8)), y=np.arange(40) % 4)
    # data.root, the older spelling, still names the file
    cfg = tiny_config(data={"name": "npz", "root": str(path), "batch_size": 8, "test_fraction": 0.2})
    state = run_plugin(["ce"], config=cfg, plugin_modules=[plugin])
    assert state.step == 2 and state.splits.image_shape == (1, 8, 8) and state.splits.classes == ["0", "1", "2", "3"]
    # 20 % of each class's 10 images is held out as the test split
    assert torch.bincount(state.splits.test.y).tolist() == [2, 2, 2, 2]
    assert len(state.splits.train) + len(state.splits.val) == 32
