"""Streamed datasets (batchkin.stream): the three formats, missing and corrupt files, the
DataLoader loop (worker-count independence, exact mid-epoch resume, BBN's two streams, the
SSL bases' raw images), the storage choice, and subsets equal to the in-memory path's.

The image folders are made here: tiny PNGs (10x12) whose pixels say which file they are
("coded": a solid colour with red = the file's number in listing order, green = 40 x its
class) or random noise (to see crops and flips).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from batchkin import faults
from batchkin.cli import main
from batchkin.data import DeviceData
from batchkin.errors import ConfigError, DataError, RunError
from batchkin.plugin import Plugins
from batchkin.stream import ImageFiles, Request, StreamData, StreamDataset
from batchkin.testing import run_plugin
from batchkin.trainer import checkpoint_dict, fit, prepare, restore, train_step
from test_engine_cli import set_args  # --set arguments of a raw config (this folder's CLI tests)

SIZE = (12, 10)  # Pillow (width, height)


def coded_folder(root: Path, counts, size=SIZE, mode="RGB", suffix=".png") -> Path:
    """Class folders c0, c1, ... with ``counts[c]`` solid images; file k (in listing order)
    has red = k, green = 40 c, blue = 200 (grayscale: value k)."""
    k = 0
    for c, n in enumerate(counts):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            colour = k if mode == "L" else (k, 40 * c, 200)
            Image.new(mode, size, colour).save(root / f"c{c}" / f"{k:04d}{suffix}")
            k += 1
    return root


def noise_folder(root: Path, counts, size=SIZE, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    k = 0
    for c, n in enumerate(counts):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(root / f"c{c}" / f"{k:04d}.png")
            k += 1
    return root


def config(root, name="imagefolder", epochs=2, model=None, **data) -> dict:
    return {
        "seed": 0, "epochs": epochs, "device": "cpu",
        "data": {"name": name, "root": str(root), "storage": "stream", "image_size": [8, 8], "batch_size": 4,
                 "eval_batch_size": 8, "num_workers": 0, "val_fraction": 0.2, "test_fraction": 0.2, **data},
        "model": model or {"name": "resnet8", "width": 4},
        "optim": {"lr": 0.05},
    }


def corrupt(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:40])  # a PNG header and nothing else


def one_line_error(capsys, argv, *fragments) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("batchkin: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def red(loaded_images: torch.Tensor) -> list[int]:
    """The red value of pixel (0, 0) of uint8 [B, H, W, C] images: the coded file number."""
    return loaded_images[:, 0, 0, 0].tolist()


def epoch_batches(raw, epochs=1, plugins=None) -> list:
    """(stream, indices, x, y) of every step of ``epochs`` epochs, without training (the run step
    still advances, as it does in training)."""
    with torch.random.fork_rng(devices=[]):
        state = prepare(raw, plugins)
        out = []
        for e in range(1, epochs + 1):
            state.epoch = e
            state.sampler.set_epoch(e)
            for indices in state.train_data.steps(state):
                for name, idx in indices.items():
                    x, y = state.train_data.batch(idx, augment=True, padding=0, hflip=True, gen=None)
                    out.append((name, idx.clone(), x, y))
                state.step += 1
        state.train_data.close()
    return out


# ------------------------------------------------------------------------------ formats


def test_streamed_image_folder_indexes_its_files_in_listing_order(tmp_path):
    root = coded_folder(tmp_path / "d", [7, 6, 5])
    state = prepare(config(root, imbalance_factor=2.0))
    assert isinstance(state.train_data, StreamData)
    s = state.splits
    assert s.classes == ["c0", "c1", "c2"] and s.image_shape == (3, 8, 8)
    for split in (s.train, s.val, s.test):
        assert isinstance(split.x, ImageFiles)
        loaded = StreamDataset(split.x, split.y)[Request("eval", {"": torch.arange(len(split))})]
        assert red(loaded.images[""]) == split.x.rows.tolist()
        assert (loaded.images[""][:, 0, 0, 1] == 40 * split.y).all()
    assert len(s.train) + len(s.val) + len(s.test) <= 18
    # the mean and std are the split's (a sample of up to 256 images, here every one)
    reds = (torch.tensor(s.train.x.rows, dtype=torch.float64) / 255).repeat_interleave(8 * 8)  # every pixel
    assert s.mean[0] == pytest.approx(float(reds.mean()), abs=1e-5)
    assert s.std[0] == pytest.approx(float(reds.std()), abs=1e-5)


def test_image_folder_with_train_and_test_subfolders(tmp_path):
    coded_folder(tmp_path / "d" / "train", [5, 5])
    coded_folder(tmp_path / "d" / "test", [3, 2])
    state = prepare(config(tmp_path / "d"))
    assert state.splits.test.y.tolist() == [0, 0, 0, 1, 1]
    assert [state.splits.test.x.path(i).split("/d/")[1] for i in range(2)] == ["test/c0/0000.png", "test/c0/0001.png"]
    assert len(state.splits.train) + len(state.splits.val) == 10


def _write_list(path: Path, rows) -> Path:
    path.write_text("# relative/path label\n\n" + "".join(f"{name} {label}\n" for name, label in rows))
    return path


def _list_dataset(tmp_path, n=(6, 4, 3)):
    root = coded_folder(tmp_path / "images", list(n))
    files = sorted(p.relative_to(root) for p in root.rglob("*.png"))
    rows = [(str(f), int(f.parts[0][1:])) for f in files]
    return root, rows


def test_image_list_files_give_train_val_and_test_splits(tmp_path):
    root, rows = _list_dataset(tmp_path)
    train, val, test = rows[0::3] + rows[1::3], rows[2::3][:2], rows[2::3][2:]
    lists = tmp_path / "lists"
    lists.mkdir()
    _write_list(lists / "train.txt", train)
    _write_list(lists / "val.txt", val)
    _write_list(root / "test.txt", test)
    raw = config(root, name="imagelist", train_list=str(lists / "train.txt"), val_list=str(lists / "val.txt"),
                 test_list="test.txt")  # absolute, and relative to data.root
    state = prepare(raw)
    s = state.splits
    assert s.classes == ["0", "1", "2"]
    # a shipped validation list is the validation split: nothing is held out of training
    assert s.train.y.tolist() == [label for _, label in train]
    assert s.val.y.tolist() == [label for _, label in val]
    assert s.test.y.tolist() == [label for _, label in test]
    assert [s.test.x.path(i) for i in range(len(test))] == [str(root / name) for name, _ in test]
    loaded = state.train_data.dataset[Request("eval", {"": torch.arange(len(train))})]
    assert red(loaded.images[""]) == [int(Path(name).stem) for name, _ in train]


def test_image_list_errors(tmp_path, capsys):
    root, rows = _list_dataset(tmp_path)
    _write_list(root / "train.txt", rows)
    (root / "bad.txt").write_text("c0/0000.png zero\n")
    with pytest.raises(DataError, match=r"bad.txt:1: expected `relative/path label`"):
        prepare(config(root, name="imagelist", train_list="bad.txt"))
    with pytest.raises(ConfigError, match="data.train_list must name"):
        prepare(config(root, name="imagelist"))
    with pytest.raises(ConfigError, match="data.storage = 'memory' is not available"):
        prepare(config(root, name="imagelist", train_list="train.txt", storage="memory"))
    with pytest.raises(DataError, match="cannot read the list file"):
        prepare(config(root, name="imagelist", train_list="nope.txt"))
    # an option of another dataset is refused, naming it
    with pytest.raises(ConfigError, match="data.train_json is an option of dataset 'inaturalist'"):
        prepare(config(root, name="imagelist", train_list="train.txt", train_json="x.json"))


def test_a_list_naming_missing_files_stops_before_training(tmp_path, capsys):
    root, rows = _list_dataset(tmp_path)
    missing = [(f"c0/gone{i}.png", 0) for i in range(7)]
    _write_list(root / "train.txt", rows[:3] + missing + rows[3:])
    out = tmp_path / "run"
    line = one_line_error(capsys, ["train", "--quiet", "--out", str(out), *set_args(
        config(root, name="imagelist", train_list="train.txt"))],
        "7 of the 20 files listed in", "train.txt are missing under", "c0/gone0.png, c0/gone1.png", "(and 2 more)")
    assert "gone5" not in line
    assert not out.exists()  # caught before the run folder is created


def _coco(images, annotations, categories=None) -> dict:
    d = {"images": [{"id": i, "file_name": f, "width": 12, "height": 10} for i, f in images],
         "annotations": [{"id": 100 + n, "image_id": i, "category_id": c} for n, (i, c) in enumerate(annotations)]}
    if categories is not None:
        d["categories"] = [{"id": c, "name": name, "supercategory": "x"} for c, name in categories]
    return d


def test_inaturalist_json_maps_category_ids_to_contiguous_labels(tmp_path):
    root = coded_folder(tmp_path / "inat", [4, 4, 4])
    files = [str(p.relative_to(root)) for p in sorted(root.rglob("*.png"))]
    cats = [(17, "Aves"), (3, "Plantae"), (250, "Fungi")]  # ids out of order, not contiguous
    cat_of_folder = {0: 17, 1: 3, 2: 250}
    train = [(i, f) for i, f in enumerate(files) if i % 4 < 3]
    val = [(i, f) for i, f in enumerate(files) if i % 4 == 3]
    (root / "train2018.json").write_text(json.dumps(_coco(train, [(i, cat_of_folder[i // 4]) for i, _ in train], cats)))
    (root / "val2018.json").write_text(json.dumps(_coco(val, [(i, cat_of_folder[i // 4]) for i, _ in val])))
    state = prepare(config(root, name="inaturalist", train_json="train2018.json", test_json="val2018.json"))
    s = state.splits
    # ids sorted: 3 -> 0 (Plantae), 17 -> 1 (Aves), 250 -> 2 (Fungi); the names are kept
    assert s.classes == ["Plantae", "Aves", "Fungi"]
    label = {17: 1, 3: 0, 250: 2}
    assert s.test.y.tolist() == [label[cat_of_folder[i // 4]] for i, _ in val]
    assert sorted(s.train.y.tolist() + s.val.y.tolist()) == sorted(label[cat_of_folder[i // 4]] for i, _ in train)
    loaded = StreamDataset(s.test.x, s.test.y)[Request("eval", {"": torch.arange(3)})]
    assert red(loaded.images[""]) == [i for i, _ in val]


def test_inaturalist_errors(tmp_path, capsys):
    root = coded_folder(tmp_path / "inat", [2, 2])
    files = [str(p.relative_to(root)) for p in sorted(root.rglob("*.png"))]
    images = list(enumerate(files))
    (root / "train.json").write_text(json.dumps(_coco(images, [(i, i // 2) for i, _ in images], [(0, "a"), (1, "b")])))
    (root / "val.json").write_text(json.dumps(_coco(images[:1], [(0, 5)])))
    with pytest.raises(DataError, match="val.json: category 5 of image 0 is not among the training categories"):
        prepare(config(root, name="inaturalist", train_json="train.json", val_json="val.json"))
    (root / "twice.json").write_text(json.dumps(_coco(images, [(i, 0) for i, _ in images] + [(0, 1)])))
    with pytest.raises(DataError, match="image 0 has more than one annotation"):
        prepare(config(root, name="inaturalist", train_json="twice.json"))
    (root / "unlabelled.json").write_text(json.dumps(_coco(images, [])))
    with pytest.raises(DataError, match="4 of its 4 images have no annotation"):
        prepare(config(root, name="inaturalist", train_json="unlabelled.json"))
    (root / "broken.json").write_text("{")
    with pytest.raises(DataError, match="cannot read the annotation file"):
        prepare(config(root, name="inaturalist", train_json="broken.json"))
    gone = _coco(images + [(9, "c1/lost.png")], [(i, i // 2) for i, _ in images] + [(9, 1)])
    (root / "gone.json").write_text(json.dumps(gone))
    one_line_error(capsys, ["train", "--quiet", "--out", str(tmp_path / "run"), *set_args(
        config(root, name="inaturalist", train_json="gone.json"))], "1 of the 5 files listed in", "c1/lost.png")


def test_image_size_and_channels_come_from_the_headers(tmp_path):
    coded_folder(tmp_path / "gray", [4, 4], mode="L")
    raw = config(tmp_path / "gray")
    raw["data"].pop("image_size")
    state = prepare(raw)
    assert state.splits.image_shape == (1, 10, 12)  # the images' own size, one channel
    Image.new("RGB", (14, 10), (1, 2, 3)).save(tmp_path / "gray" / "c0" / "9999.png")
    raw["data"]["val_fraction"] = 0.0
    with pytest.raises(ConfigError, match=r"different sizes .*set data.image_size"):
        prepare(raw)
    raw["data"]["image_size"] = [6, 6]
    assert prepare(raw).splits.image_shape == (3, 6, 6)  # one colour image among gray ones: RGB


def test_auto_storage_keeps_small_folders_in_memory(tmp_path):
    root = coded_folder(tmp_path / "d", [5, 5])
    raw = config(root, storage="auto")
    state = prepare(raw)
    assert type(state.train_data) is DeviceData  # 10 images of 8x8x3 bytes: well within the budget
    raw["data"]["memory_budget_mb"] = 0
    assert isinstance(prepare(raw).train_data, StreamData)
    raw["data"]["storage"] = "memory"
    assert type(prepare(raw).train_data) is DeviceData


def test_streamed_subsets_equal_the_in_memory_subsets(tmp_path):
    """Long-tailed, few-shot and sized subsets and the held-out splits come from the labels:
    streamed and in-memory runs of one folder keep the same files."""
    root = coded_folder(tmp_path / "d", [30, 24, 20, 16])
    for data in ({"imbalance_factor": 5.0}, {"few_shot": 6}, {"train_size": 20}, {"imbalance_factor": 3.0, "train_size": 25}):
        cfg = config(root, **data)
        mem = prepare({**cfg, "data": {**cfg["data"], "storage": "memory", "image_size": []}}).splits
        st = prepare(cfg).splits
        for name in ("train", "val", "test"):
            m, s = getattr(mem, name), getattr(st, name)
            assert m.x[:, 0, 0, 0].tolist() == s.x.rows.tolist(), (data, name)  # red = the file's number
            assert torch.equal(m.y, s.y)
        assert torch.equal(mem.train_counts(), st.train_counts())


# ------------------------------------------------------------------------------ the loop


@pytest.mark.parametrize("methods", [["ce"], ["bbn"]])
def test_augmented_batches_do_not_depend_on_the_worker_count(tmp_path, methods):
    root = noise_folder(tmp_path / "d", [12, 8, 6])
    runs = []
    for workers in (0, 1, 2):
        raw = config(root, num_workers=workers, persistent_workers=workers == 1)
        raw["methods"] = methods
        runs.append(epoch_batches(raw, epochs=2))
    ref = runs[0]
    assert {name for name, *_ in ref} == ({""} if methods == ["ce"] else {"", "rev"})
    for other in runs[1:]:
        assert len(other) == len(ref)
        for (n0, i0, x0, y0), (n1, i1, x1, y1) in zip(ref, other):
            assert n0 == n1 and torch.equal(i0, i1) and torch.equal(x0, x1) and torch.equal(y0, y1)
    # the crops are random: an image's two epochs differ, and differ from the centred view
    first = {int(i): x[k] for name, idx, x, _ in ref[: len(ref) // 2] if name == "" for k, i in enumerate(idx)}
    second = {int(i): x[k] for name, idx, x, _ in ref[len(ref) // 2 :] if name == "" for k, i in enumerate(idx)}
    both = sorted(first.keys() & second.keys())
    assert both and all(not torch.equal(first[i], second[i]) for i in both)


def test_a_sample_drawn_twice_gets_two_crops_and_the_draws_are_per_slot(tmp_path):
    root = noise_folder(tmp_path / "d", [6, 6])
    state = prepare(config(root))
    ds = state.train_data.dataset
    a = ds[Request("train", {"": torch.tensor([3, 3, 3, 1])}, seed=0, step=7)].images[""]
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])
    # slot k's numbers depend on (seed, step, stream, slot) only: not on the other samples
    b = ds[Request("train", {"": torch.tensor([3])}, seed=0, step=7, base_slot=1)].images[""]
    assert torch.equal(b[0], a[1])
    c = ds[Request("train", {"rev": torch.tensor([3, 3])}, seed=0, step=7)].images["rev"]
    d = ds[Request("train", {"": torch.tensor([3, 3])}, seed=0, step=8)].images[""]
    assert not torch.equal(c[0], a[0]) and not torch.equal(d[0], a[0])


def test_bbn_streams_both_samplers_indices(tmp_path):
    root = coded_folder(tmp_path / "d", [16, 6, 3])
    raw = config(root, augment=False, batch_size=6)
    state = run_plugin(["bbn"], steps=3, config=raw)
    data = state.train_data
    for key in ("", "_rev"):
        x, idx = state.batch["x" + key], state.batch["idx" + key]
        # un-normalise the red channel: the coded file numbers of the train split's rows
        reds = (x[:, 0, 0, 0] * data.std.view(-1)[0] + data.mean.view(-1)[0]) * 255
        assert reds.round().long().tolist() == state.splits.train.x.rows[idx.numpy()].tolist()
        assert torch.equal(state.batch["y" + key], state.splits.train.y[idx])
    assert not torch.equal(state.batch["idx"], state.batch["idx_rev"])


def test_ssl_bases_read_the_steps_raw_batch(tmp_path):
    root = coded_folder(tmp_path / "d", [8, 8])
    raw = config(root, batch_size=4, drop_last=True)
    raw["model"] = {"name": "resnet8", "width": 4}
    state = run_plugin(["moco"], steps=2, config=raw)
    data = state.train_data
    assert data.raw_mode
    idx = state.batch["idx"]
    images = data.x[idx]
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 8, 8)
    assert images[:, 0, 0, 0].tolist() == state.splits.train.x.rows[idx.numpy()].tolist()
    with pytest.raises(RunError, match="not one of the current step's streams"):
        data.x[idx + 1]
    # kNN evaluation encodes the streamed training split; the linear probe reads every split
    from batchkin.plugins.ssl import probe_state
    from batchkin.trainer import evaluate

    metrics = evaluate(state, "val", DeviceData(state.splits.val, state.splits, state.device))
    assert 0.0 <= metrics["top1"] <= 1.0 and len(metrics["per_class"]) == 2
    probe = probe_state(state, epochs=2)
    assert probe["feature_dim"] == state.unwrapped_model.feature_dim and 0.0 <= probe["top1"] <= 1.0


def test_streamed_batches_outside_the_loop_and_unfaithful_samplers_are_refused(tmp_path):
    root = noise_folder(tmp_path / "d", [6, 6])
    state = prepare(config(root))
    with pytest.raises(RunError, match=r"iterate state.train_data.steps\(state\)"):
        state.train_data.batch(torch.arange(4), augment=True, padding=0, hflip=True, gen=None)

    class Drifting:
        """A sampler whose copies draw other indices (its position lives outside its state)."""
        shared = [0]

        def __len__(self):
            return 2

        def __iter__(self):
            for _ in range(2):
                self.shared[0] += 1
                yield {"": torch.arange(4) + self.shared[0] % 3}

        def state_dict(self):
            return {}

    state.sampler = Drifting()
    with pytest.raises(RunError, match="drew other indices from a copy of its own state"):
        list(state.train_data.steps(state))


def test_streamed_loading_leaves_the_global_rng_alone(tmp_path):
    root = noise_folder(tmp_path / "d", [6, 6])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        state = prepare(config(root, num_workers=1))
        before = torch.get_rng_state()
        state.sampler.set_epoch(1)
        for indices in state.train_data.steps(state):
            state.train_data.batch(indices[""], augment=True, padding=0, hflip=True, gen=None)
        list(state.train_data.eval_batches(4))
        assert torch.equal(torch.get_rng_state(), before)
        state.train_data.close()


def _train(state, stop_at=None):
    """fit's epoch loop over the state's remaining steps, stopping after run step ``stop_at``."""
    while state.epoch < state.config.epochs or state.sampler.position < len(state.sampler):
        if state.sampler.position >= len(state.sampler) or state.epoch == 0:
            state.epoch += 1
        state.sampler.set_epoch(state.epoch)
        for indices in state.train_data.steps(state):
            train_step(state, indices)
            if state.step == stop_at:
                return


def test_mid_epoch_resume_is_exact_on_the_streamed_path(tmp_path):
    root = noise_folder(tmp_path / "d", [12, 8, 6])
    straight_raw = config(root, epochs=2, num_workers=0)
    resumed_raw = config(root, epochs=2, num_workers=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        straight = prepare(straight_raw)
        _train(straight)
        steps = straight.step
        torch.manual_seed(1)
        first = prepare(resumed_raw)
        _train(first, stop_at=steps // 2 + 1)  # mid-epoch 2
        assert 0 < first.sampler.position < len(first.sampler)
        buf = io.BytesIO()
        torch.save(checkpoint_dict(first, {}), buf)
        first.train_data.close()
        torch.manual_seed(5)
        second = prepare(resumed_raw)
        restore(second, torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
        _train(second)
        second.train_data.close()
    assert second.step == steps
    want, got = straight.unwrapped_model.state_dict(), second.unwrapped_model.state_dict()
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_kill_then_resume_equals_uninterrupted_on_the_streamed_path(tmp_path):
    """SIGKILL mid-epoch (the worker processes die with it), resume from the last checkpoint:
    the same weights and metrics as a run never interrupted (that one in this process)."""
    root = noise_folder(tmp_path / "d", [12, 8, 6])
    raw = config(root, epochs=2, num_workers=1)
    ref, run = tmp_path / "ref", tmp_path / "run"
    fit({**raw, "methods": ["ce", "killer"]}, ref, plugins=Plugins(extra_files=[faults.PLUGIN_FILE]), progress=False)
    steps_per_epoch = faults.checkpoint(ref)["step"] // 2
    cli = ["train", "--quiet", "--out", str(run), *set_args(raw), *faults.KILLER_ARGS]
    r = faults.run("step", steps_per_epoch + 2, cli)
    assert r.returncode == -9, r.stderr[-2000:]
    r = faults.run("none", 0, ["train", "--quiet", "--resume", str(run), "--plugin", faults.PLUGIN_FILE])
    assert r.returncode == 0, r.stderr[-2000:]
    want, got = faults.checkpoint(ref)["model"], faults.checkpoint(run)["model"]
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert faults.epoch_lines(run) == faults.epoch_lines(ref)


# ------------------------------------------------------------------------------ bad files


def _bad_list_dataset(tmp_path, bad_in: str):
    root, rows = _list_dataset(tmp_path, (8, 6, 4))
    train, val, test = rows[0::3] + rows[1::3], rows[2::3][:3], rows[2::3][3:]
    split = {"train": train, "val": val, "test": test}
    bad = split[bad_in][1][0]
    corrupt(root / bad)
    for name, part in split.items():
        _write_list(root / f"{name}.txt", part)
    return root, bad, split


def test_a_corrupt_image_in_a_worker_is_one_line_naming_the_file(tmp_path, capsys):
    root, bad, _ = _bad_list_dataset(tmp_path, "val")  # decoded first by a worker, at the first evaluation
    raw = config(root, name="imagelist", train_list="train.txt", val_list="val.txt", test_list="test.txt",
                 num_workers=1, epochs=1)
    one_line_error(capsys, ["train", "--quiet", "--out", str(tmp_path / "run"), *set_args(raw)],
                   f"{root / bad} is not a readable image")


def test_a_corrupt_training_image_is_caught_by_the_training_workers(tmp_path):
    root = noise_folder(tmp_path / "d", [6, 6])
    state = prepare(config(root, num_workers=2, val_fraction=0.0))
    bad = state.splits.train.x.path(5)
    corrupt(Path(bad))  # broken after the set-up read it
    state.sampler.set_epoch(1)
    with pytest.raises(DataError, match=f"^{bad} is not a readable image: "):
        for indices in state.train_data.steps(state):
            state.train_data.batch(indices[""], augment=True, padding=0, hflip=True, gen=None)


def test_skip_bad_replaces_counts_and_logs_unreadable_images(tmp_path, capsys):
    root, bad, split = _bad_list_dataset(tmp_path, "train")
    raw = config(root, name="imagelist", train_list="train.txt", val_list="val.txt", test_list="test.txt",
                 num_workers=1, skip_bad=True, drop_last=False, epochs=2, augment=False)
    state = prepare(raw)
    # the replacement is the next readable image of the same class, in the split's order
    train_names = [name for name, _ in split["train"]]
    i = train_names.index(bad)
    same = [j for j, (_, label) in enumerate(split["train"]) if label == split["train"][i][1] and j > i]
    loaded = state.train_data.dataset[Request("eval", {"": torch.tensor([i])})]
    assert red(loaded.images[""]) == [int(Path(train_names[same[0]]).stem)]
    assert loaded.skipped == [(str(root / bad), loaded.skipped[0][1], str(root / train_names[same[0]]))]
    capsys.readouterr()
    result = fit(raw, tmp_path / "run", progress=False)
    err = capsys.readouterr().err
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("data/skipped_images") for r in lines if r["kind"] == "epoch"] == [1, 1]
    assert err.count(f"skipping unreadable image {root / bad}") == 1  # logged once, counted every time
    assert result.final["kind"] == "final" and lines[-1]["kind"] == "final"
    # `batchkin eval` of the streamed run: the same test metrics from the saved weights
    assert main(["eval", str(tmp_path / "run")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["top1"] == result.final["test/top1"] and out["per_class"] == result.final["test/per_class"]


def test_storage_stream_for_a_dataset_kept_in_memory_is_refused(tmp_path):
    raw = config(tmp_path, name="synthetic")
    raw["data"].pop("root")
    with pytest.raises(ConfigError, match="data.storage = 'stream' is not available for data.name = 'synthetic'"):
        prepare(raw)
    raw["data"]["storage"] = "auto"
    assert type(prepare(raw).train_data) is DeviceData


def test_skip_bad_stops_when_no_image_of_the_class_is_readable(tmp_path):
    root = coded_folder(tmp_path / "d", [6, 6])
    state = prepare(config(root, skip_bad=True, val_fraction=0.0))
    train = state.splits.train
    ones = [i for i in range(len(train)) if int(train.y[i]) == 1]
    for i in ones:
        corrupt(Path(train.x.path(i)))
    loaded = StreamDataset(train.x, train.y)[Request("train", {"": torch.tensor([ones[0], 0])}, seed=0, step=0)]
    assert loaded.error.startswith(f"{train.x.path(ones[0])} is not a readable image")
    assert loaded.error.endswith("data.skip_bad found no readable image of its class 1 to use instead")


def test_missing_files_are_found_by_the_threaded_check_in_list_order(tmp_path, monkeypatch):
    from batchkin import stream

    names = [f"f{i:02d}.png" for i in range(40)]
    for i, name in enumerate(names):
        if i not in (3, 17, 18, 39):
            (tmp_path / name).touch()
    monkeypatch.setattr(stream, "STAT_CHUNK", 6)  # 7 chunks over the thread pool
    table = stream.PathTable(tmp_path, names)
    with pytest.raises(DataError, match=r"^4 of the 40 files listed in L are missing under .*: "
                                        r"f03.png, f17.png, f18.png, f39.png$"):
        stream.check_files_exist(table, np.arange(40), "L")
    stream.check_files_exist(table, np.array([0, 1, 2, 4]), "L")  # all present: no error
