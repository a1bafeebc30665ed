"""Messages that used to mislead: each names the real cause (the key, the label, the channels,
the mismatch) and echoes user values cut to a readable length."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from contract import TINY
from hostile import idx_folder, image_folder, plugin, png, small_idx_set

from batchkin.config import DataConfig
from batchkin.data import ImageDataset, make_splits
from batchkin.errors import DataError

TRAIN = ["train", *TINY]


def test_crop_padding_larger_than_the_images_is_not_out_of_memory(user_error, tmp_path):
    out = tmp_path / "run"
    line = user_error([*TRAIN, "--set", "data.crop_padding=100000", "--out", out],
                      "data.crop_padding = 100000 must be smaller than the images (6x6)", "use at most 5",
                      unchanged=[out])
    assert "out of memory" not in line and "batch_size" not in line and "batch size" not in line


def test_crop_padding_is_free_without_augmentation(tmp_path):
    from batchkin.cli import main

    assert main([*TRAIN, "--set", "data.crop_padding=100000", "--set", "data.augment=false",
                 "--out", str(tmp_path / "run")]) == 0


def test_an_idx_label_of_200_is_named(user_error, tmp_path):
    x, y = small_idx_set(classes=4)
    y = y.copy()
    y[7] = 200
    root = idx_folder(tmp_path / "idx", x, y)
    line = user_error([*TRAIN, "--set", "data.name=idx", "--set", f"data.root={root}", "--out", tmp_path / "run"],
                      str(root / "train-labels-idx1-ubyte"), "label 200 implies 201 classes", "labels 4, 5, 6",
                      unchanged=[root, tmp_path / "run"])
    assert "no training images" not in line


LABELS_PLUGIN = """
import torch
from batchkin.data import ImageDataset


def labels_200(cfg):
    y = torch.arange(40) % 5
    y[7] = 200
    return ImageDataset(torch.zeros(40, 1, 6, 6, dtype=torch.uint8), y, ["a", "b", "c", "d", "e"], name="labels200")


def gap(cfg):
    y = torch.tensor([0, 1, 3] * 12)
    return ImageDataset(torch.zeros(36, 1, 6, 6, dtype=torch.uint8), y, ["a", "b", "c", "d"], name="gap")


@hookimpl
def register_datasets(register):
    register("labels200", labels_200)
    register("gap", gap)
"""


@pytest.mark.parametrize("dataset, fragment", [
    ("labels200", "labels200: training label 200 is out of range for the 5 classes (labels must lie in [0, 4]"),
    ("gap", "gap: no image has label 2 of the 4 classes; the labels found are 0, 1, 3"),
])
def test_a_plugin_datasets_bad_label_is_named(user_error, tmp_path, dataset, fragment):
    path = plugin(tmp_path, f"labels_{dataset}", LABELS_PLUGIN)
    line = user_error([*TRAIN, "--plugin", path, "--set", f"data.name={dataset}", "--out", tmp_path / "run"],
                      fragment, unchanged=[path, tmp_path / "run"])
    assert "no training images" not in line


def test_a_class_whose_images_are_all_held_out_says_so():
    y = torch.tensor([0, 1] * 10)
    ds = ImageDataset(torch.zeros(20, 1, 4, 4, dtype=torch.uint8), y, ["a", "b", "c"],
                      test_x=torch.zeros(3, 1, 4, 4, dtype=torch.uint8), test_y=torch.tensor([0, 1, 2]), name="held")
    with pytest.raises(DataError, match=r"held: class 2 \(c\) has no training images \(all its 1 image\(s\) are in "
                                        r"the validation or test split\)"):
        make_splits(ds, DataConfig())


def test_grey_and_rgb_images_say_the_channels_differ(user_error, tmp_path):
    root = image_folder(tmp_path / "images", {"a/grey.png": png((6, 6), "L"), "b/colour.png": png((6, 6), "RGB")})
    line = user_error([*TRAIN, "--set", "data.name=imagefolder", "--set", f"data.root={root}",
                       "--set", "data.image_size=[6,6]", "--out", tmp_path / "run"],
                      "images with different channels", "colour.png is RGB (3 channels)", "grey.png is grey (1 channel)",
                      unchanged=[root, tmp_path / "run"])
    assert "image_size" not in line


def test_a_folder_given_as_the_config(user_error, tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    line = user_error([*TRAIN, folder, "--out", tmp_path / "run"], f"config file {folder} is a folder",
                      unchanged=[folder, tmp_path / "run"])
    assert "not found" not in line


def test_a_folder_given_as_a_plugin_file_or_a_file_as_the_data_folder(user_error, tmp_path):
    folder = tmp_path / "plugins"
    folder.mkdir()
    user_error([*TRAIN, "--plugin", folder, "--out", tmp_path / "run"], f"plugin file {folder} is a folder",
               unchanged=[folder, tmp_path / "run"])
    (tmp_path / "data.bin").write_bytes(b"\0" * 16)
    user_error([*TRAIN, "--set", "data.name=idx", "--set", f"data.root={tmp_path / 'data.bin'}", "--out", tmp_path / "run"],
               f"data.root {tmp_path / 'data.bin'} is a file; it must name the dataset's folder",
               unchanged=[tmp_path / "data.bin", tmp_path / "run"])


def test_a_multi_megabyte_value_is_cut_in_the_message(user_error, tmp_path):
    huge = "x" * 3_000_000
    line = user_error([*TRAIN, "--set", f"data.batch_size='{huge}'", "--out", tmp_path / "run"],
                      "data.batch_size must be an integer, got str 'xxx", "... (3000000 characters)")
    assert len(line) < 300
    cfg = tmp_path / "huge.toml"
    cfg.write_text(f'[optim]\nname = "{huge}"\n')
    assert len(user_error([*TRAIN, cfg, "--out", tmp_path / "run"], "optim.name must be one of 'sgd', 'adamw'; got 'xxx")) < 300
    # a value the message does not format itself (a 3 MB key) is cut by the command line's formatter
    line = user_error([*TRAIN, "--set", f"{huge}=1", "--out", tmp_path / "run"], "unknown config key xxx",
                      "characters cut")
    assert len(line) < 2200


def test_a_multi_line_exception_text_stays_one_line(user_error, tmp_path):
    path = plugin(tmp_path, "multiline", """
class Multi(Method):
    @hookimpl
    def configure(self, state):
        raise RuntimeError("first line\\nsecond line\\n\\nthird line")


@hookimpl
def register_methods(register):
    register("multi", Multi)
""")
    user_error([*TRAIN, "--plugin", path, "--set", 'methods=["ce","multi"]', "--out", tmp_path / "run"],
               "RuntimeError: first line | second line | third line")


@pytest.fixture
def run_copy(trained_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(trained_run, out)
    return out


def _set_model(run, table: str) -> None:
    text = (run / "config.toml").read_text()
    start = text.index("[model]")
    end = text.index("\n[", start + 1)
    (run / "config.toml").write_text(text[:start] + table + text[end:])


def test_a_state_dict_mismatch_shows_the_mismatch(user_error, run_copy):
    _set_model(run_copy, '[model]\nname = "tiny"\nwidth = 5\n')
    user_error(["eval", run_copy], "the checkpoint does not fit the model: shapes differ:",
               "conv.weight is [8, 3, 3, 3] in the checkpoint but [5, 3, 3, 3] in the model", unchanged=[run_copy])
    _set_model(run_copy, '[model]\nname = "resnet8"\nwidth = 4\n')
    user_error(["eval", run_copy], "missing keys trunk.0.weight, trunk.1.weight, trunk.1.bias, trunk.1.running_mean "
               "(+50 more); unexpected keys conv.weight, conv.bias; shapes differ: classifier.weight is [4, 8]",
               unchanged=[run_copy])


class _RunsShell:
    def __reduce__(self):
        return (os.system, ("true",))


def test_a_checkpoint_refused_by_the_weights_only_loader_names_the_object(user_error, run_copy):
    torch.save({"format": 1, "model": _RunsShell()}, run_copy / "checkpoints" / "last.pt")
    line = user_error(["eval", run_copy], "last.pt cannot be loaded: UnpicklingError:", "GLOBAL posix.system",
                      unchanged=[run_copy])
    assert "will likely succeed" not in line


def test_state_dict_mismatch_lists_a_few_of_many():
    from batchkin.models import state_dict_mismatch

    module = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(6)])
    msg = state_dict_mismatch(module, {"extra": torch.zeros(1)})
    assert msg == ("missing keys 0.weight, 0.bias, 1.weight, 1.bias (+8 more); unexpected keys extra")
    assert state_dict_mismatch(module, module.state_dict()) == ""
    assert state_dict_mismatch(module, [1, 2]) == "the checkpoint holds list instead of a state dict"
