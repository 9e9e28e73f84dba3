"""Tests for tlkeras.data: every source, the split, the pipeline, and every bad file kind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import badfiles
import numpy as np
import pytest
import tensorflow as tf

from tlkeras import progress
from tlkeras.data import DataConfig, load, sources
from tlkeras.data import files as data

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
HYMENOPTERA = SHARED / "data" / "hymenoptera" / "train"
SMALL = {"image_size": (16, 16), "batch_size": 8}


def take_all(ds: tf.data.Dataset):
    xs, ys = [], []
    for x, y in ds:
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def id_arrays(n_per_class=(30, 20, 10), size=4):
    """Arrays whose pixel (0, 0) encodes the example id, so splits can be compared exactly."""
    y = np.repeat(np.arange(len(n_per_class)), n_per_class)
    x = np.zeros((len(y), size, size, 3), np.uint8)
    ids = np.arange(len(y))
    x[:, 0, 0, 0], x[:, 0, 0, 1] = ids % 256, ids // 256
    return x, y


def ids_of(ds):
    x, _ = take_all(ds)
    return (x[:, 0, 0, 0] + 256 * x[:, 0, 0, 1]).astype(int)


# ------------------------------------------------------------------------------------------------
# DataConfig


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_size": (0, 10)},
        {"image_size": (10,)},
        {"image_size": "224"},
        {"batch_size": 0},
        {"batch_size": 2.5},
        {"validation_split": 1.0},
        {"test_split": -0.1},
        {"validation_split": 0.5, "test_split": 0.5},
        {"max_bad_fraction": 1.5},
        {"seed": "x"},
        {"cache": "yes"},
        {"shuffle_buffer": 0},
        {"max_pixels": 0},
    ],
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match="expected"):
        DataConfig(**kwargs)


def test_config_normalises_square_size():
    assert DataConfig(image_size=64).image_size == (64, 64)
    assert DataConfig(image_size=[32, 48]).image_size == (32, 48)


def test_unknown_override_is_type_error(tmp_path):
    with pytest.raises(TypeError, match="imagesize"):
        load("digits", imagesize=32)


# ------------------------------------------------------------------------------------------------
# Sources


def test_folder_source(tmp_path):
    root = badfiles.make_dataset(tmp_path / "d", {"b": 10, "a": 12, "c": 8})
    d = load(root, **SMALL)
    assert d.class_names == ["a", "b", "c"]  # sorted, independent of creation order
    assert {s: sum(c.values()) for s, c in d.counts.items()} == {
        "train": 18,
        "validation": 6,
        "test": 6,
    }
    x, y = take_all(d.train)
    assert x.shape == (18, 16, 16, 3) and x.dtype == np.float32 and y.dtype == np.int32
    assert 0 <= x.min() and x.max() <= 255 and x.max() > 1  # raw pixels, not rescaled
    assert np.bincount(y, minlength=3).tolist() == [d.counts["train"][c] for c in d.class_names]
    # the tint is the class: labels line up with the images' dominant channel
    assert (x.mean(axis=(1, 2)).argmax(axis=1)[y == 0] == 1).all()  # "a" was made second: green
    assert d.train.element_spec[0].shape.as_list() == [None, 16, 16, 3]
    assert d.skipped == [] and d.warnings == []


def test_folder_with_train_val_test(tmp_path):
    for split, n in (("train", 10), ("val", 4), ("test", 3)):
        badfiles.make_dataset(tmp_path / split, ("x", "y"), per_class=n, seed=len(split))
    d = load(tmp_path, **SMALL)
    assert d.counts == {
        "train": {"x": 10, "y": 10},
        "validation": {"x": 4, "y": 4},
        "test": {"x": 3, "y": 3},
    }


def test_folder_with_train_val_carves_only_test(tmp_path):
    badfiles.make_dataset(tmp_path / "train", ("x", "y"), per_class=10)
    badfiles.make_dataset(tmp_path / "validation", ("x",), per_class=3)  # a class may be missing
    d = load(tmp_path, test_split=0.2, **SMALL)
    assert d.counts["validation"] == {"x": 3, "y": 0}
    assert d.counts["test"] == {"x": 2, "y": 2} and d.counts["train"] == {"x": 8, "y": 8}


def test_validation_folder_with_unknown_class(tmp_path):
    badfiles.make_dataset(tmp_path / "train", ("x", "y"), per_class=5)
    badfiles.make_dataset(tmp_path / "val", ("x", "zebra"), per_class=2)
    with pytest.raises(ValueError, match="zebra"):
        load(tmp_path, **SMALL)


def test_given_validation_argument(tmp_path):
    train = badfiles.make_dataset(tmp_path / "tr", ("x", "y"), per_class=10)
    val = badfiles.make_dataset(tmp_path / "va", ("y",), per_class=3)
    d = load(train, validation=val, **SMALL)
    assert d.counts["validation"] == {"x": 0, "y": 3}
    assert sum(d.counts["train"].values()) + sum(d.counts["test"].values()) == 20
    x, y = take_all(d.validation)
    assert (y == 1).all()  # val labels follow the training class order


def test_arrays_source_grayscale_and_names():
    x = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 1)).astype(np.uint8)
    y = np.arange(40) % 2
    d = load((x, y), class_names=["no", "yes"], image_size=(8, 8), test_split=0.0)
    assert d.class_names == ["no", "yes"] and d.test is None
    images, _ = take_all(d.train)
    assert images.shape[1:] == (8, 8, 3)
    assert (images[..., 0] == images[..., 2]).all()  # gray replicated to RGB
    assert "no test split" in d.summary()


def test_arrays_resize_identity_keeps_pixels():
    x, y = id_arrays()
    d = load((x, y), image_size=(4, 4), validation_split=0.0, test_split=0.0, shuffle_buffer=1)
    images, _ = take_all(d.train)
    order = [int(item.split()[1]) for item in d.items["train"]]  # the seeded permutation
    np.testing.assert_array_equal(images, x[order].astype(np.float32))


def test_arrays_multilabel():
    x = np.full((30, 6, 6, 3), 100, np.uint8)
    y = np.zeros((30, 3), np.int64)
    y[np.arange(30), np.arange(30) % 3] = 1
    y[::2, 0] = 1
    d = load((x, y), class_names=["a", "b", "c"], image_size=(6, 6))
    assert d.multilabel
    _, labels = take_all(d.train)
    assert labels.dtype == np.float32 and labels.shape[1] == 3
    assert sum(d.counts["train"].values()) == labels.sum()
    with pytest.raises(ValueError, match="single-label"):
        d.class_weight()


@pytest.mark.parametrize(
    "x, y, match",
    [
        (np.zeros((10, 8, 8, 4), np.uint8), np.arange(10) % 2, "C in"),
        (np.zeros((10, 8), np.uint8), np.arange(10) % 2, r"\[N, H, W, C\]"),
        (np.zeros((10, 8, 8, 3), np.uint8), np.arange(9) % 2, "as many labels"),
        (np.full((10, 8, 8, 3), 0.5, np.float32), np.arange(10) % 2, "0–255"),
        (np.full((10, 8, 8, 3), 300.0, np.float32), np.arange(10) % 2, r"\[0, 255\]"),
        (np.zeros((10, 8, 8, 3), np.uint8), -(np.arange(10) % 2), ">= 0"),
        (np.zeros((10, 8, 8, 3), np.uint8), np.zeros((10, 2, 2)), r"\[N\]"),
        (np.zeros((10, 8, 8, 3), np.uint8), np.full((10, 3), 2), "multi-hot"),
    ],
)
def test_arrays_bad_shapes(x, y, match):
    with pytest.raises((ValueError, TypeError), match=match):
        load((x, y), image_size=(8, 8))


def test_arrays_class_names_mismatch():
    x, y = id_arrays()
    with pytest.raises(ValueError, match="expected 3 names"):
        load((x, y), class_names=["a", "b"], image_size=(4, 4))


@pytest.mark.parametrize(
    "spec, names, n",
    [("digits", [str(i) for i in range(10)], 1797), ("digits:0-4", list("01234"), 901)],
)
def test_digits(spec, names, n):
    d = load(spec, image_size=(12, 12), batch_size=64)
    assert d.class_names == names
    assert sum(sum(c.values()) for c in d.counts.values()) == n
    x, y = next(iter(d.train))
    assert x.shape[1:] == (12, 12, 3) and 0 <= y.numpy().min() and y.numpy().max() < len(names)
    assert float(tf.reduce_max(x)) > 200  # 0–16 scaled to 0–255


def test_digits_upper_subset_is_reindexed():
    d = load("digits:5-9", image_size=(8, 8), validation_split=0.0, test_split=0.0)
    assert d.class_names == ["5", "6", "7", "8", "9"]
    _, y = take_all(d.train)
    assert sorted(set(y.tolist())) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("spec", ["digits:4-2", "digits:0-10", "digits:x"])
def test_digits_bad_spec(spec):
    with pytest.raises(ValueError, match="digits"):
        load(spec)


@pytest.mark.parametrize("name, num_classes", [("mnist", 10), ("tf_flowers", 5)])
def test_tfds_mock(name, num_classes):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=200):  # random labels: enough to stratify 10 classes
        d = load(
            f"tfds:{name}", image_size=(8, 8), batch_size=50, validation_split=0.25, test_split=0.25
        )
        assert len(d.class_names) == num_classes
        assert d.source == f"tfds:{name}:train"
        total = {s: sum(c.values()) for s, c in d.counts.items()}
        assert total == {"train": 100, "validation": 50, "test": 50}
        x, y = take_all(d.train)
        assert x.shape == (100, 8, 8, 3) and y.dtype == np.int32
        assert np.bincount(y, minlength=num_classes).tolist() == list(d.counts["train"].values())


def test_tfds_given_validation_split():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=100):
        d = load("tfds:mnist", validation="tfds:mnist:test", image_size=(8, 8), test_split=0.2)
        assert {s: sum(c.values()) for s, c in d.counts.items()} == {
            "train": 80,
            "validation": 100,
            "test": 20,
        }


def test_tfds_unknown_name_is_short():
    with pytest.raises(ValueError, match="did you mean") as info:
        load("tfds:mnistt")
    assert len(str(info.value)) < 200 and "\n" not in str(info.value)


def test_tfds_bad_spec():
    with pytest.raises(ValueError, match="tfds:NAME"):
        load("tfds:")


# ------------------------------------------------------------------------------------------------
# Splits and pipeline


def test_split_stratified_disjoint_deterministic():
    x, y = id_arrays((30, 20, 10))
    kw = {"image_size": (4, 4), "validation_split": 0.2, "test_split": 0.2}
    a, b, c = load((x, y), **kw), load((x, y), **kw), load((x, y), seed=1, **kw)
    parts = {s: ids_of(getattr(a, s)) for s in ("train", "validation", "test")}
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(60))  # disjoint, all
    assert a.counts["validation"] == {"0": 6, "1": 4, "2": 2}  # stratified: 20% of each class
    assert a.counts["test"] == {"0": 6, "1": 4, "2": 2}
    for s in ("validation", "test"):
        assert sorted(ids_of(getattr(b, s))) == sorted(parts[s])  # same seed, same split
    assert sorted(ids_of(c.test)) != sorted(parts["test"])  # other seed, other split


def test_shuffle_seeded_and_reshuffled_each_epoch():
    x, y = id_arrays((40, 40))
    kw = {"image_size": (4, 4), "validation_split": 0.0, "test_split": 0.25}
    d1, d2 = load((x, y), **kw), load((x, y), **kw)
    epoch1, epoch2 = ids_of(d1.train), ids_of(d1.train)
    assert sorted(epoch1) == sorted(epoch2) and list(epoch1) != list(epoch2)
    assert list(ids_of(d2.train)) == list(epoch1)  # same seed, same order
    assert list(ids_of(d1.test)) == sorted(ids_of(d1.test))  # evaluation splits keep file order


def test_training_batches_mix_classes_beyond_the_shuffle_buffer():
    # Sorted by class (as a folder lists them) and 30x the shuffle buffer: without a permutation
    # before the buffer, every batch held one or two classes (the CIFAR-10 fine-tuning collapse).
    x, y = id_arrays((300, 300, 300, 300), size=2)
    kw = {"image_size": (2, 2), "validation_split": 0.0, "test_split": 0.0, "batch_size": 40}
    data = load((x, y), shuffle_buffer=40, **kw)
    batches = [np.asarray(labels) for _, labels in data.train]
    assert min(len(np.unique(b)) for b in batches) == 4  # every batch has all four classes
    first_half = np.concatenate(batches[: len(batches) // 2])
    assert np.bincount(first_half, minlength=4).min() > 100  # no class waits for the end
    order = ids_of(data.ordered("train"))
    assert [f"index {i}" for i in order] == data.items["train"]  # items follow the order
    assert sorted(order) == list(range(1200)) and list(order) != sorted(order)


def test_class_too_small_to_stratify():
    x, y = id_arrays((20, 20, 2))
    with pytest.raises(ValueError, match=r"smallest classes '2': \d"):
        load((x, y), image_size=(4, 4))


def test_class_weight_balanced():
    x, y = id_arrays((30, 10))
    d = load((x, y), image_size=(4, 4), validation_split=0.0, test_split=0.0)
    weights = d.class_weight()
    assert weights == pytest.approx({0: 40 / (2 * 30), 1: 40 / (2 * 10)})


@pytest.mark.parametrize(
    "budget_mib,in_files", [(512, set()), (0, {"train", "validation", "test"})]
)
def test_splits_past_the_memory_budget_are_cached_in_files(
    tmp_path, monkeypatch, budget_mib, in_files
):
    """Decoded images past ``memory_cache_mib`` go to a file cache, filled at load: every pass then
    reads the same images as the in-memory cache gives."""
    root = badfiles.make_dataset(tmp_path / "data", ("x", "y"), per_class=10, size=(16, 16))
    monkeypatch.setattr(sources.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    reference = load(root, **SMALL)
    d = load(root, memory_cache_mib=budget_mib, **SMALL)
    files = {p.name.split(".")[0] for p in (tmp_path / "tmp").glob("tlkeras_decoded_*/*")}
    assert files == in_files
    for split in ("train", "validation", "test"):
        expected = take_all(reference.ordered(split))
        for _ in range(2):  # the second pass reads the cache
            np.testing.assert_array_equal(take_all(d.ordered(split))[0], expected[0])
    x, _ = take_all(d.train)  # shuffled, same images
    assert sorted(x.sum(axis=(1, 2, 3))) == sorted(take_all(reference.train)[0].sum(axis=(1, 2, 3)))


def test_the_memory_budget_keeps_the_smallest_splits():
    config = DataConfig(image_size=(32, 32), memory_cache_mib=1)  # 1 MiB: 341 images of 32x32x3
    assert sources.splits_in_memory({"train": 300, "validation": 40, "test": 40}, config) == {
        "validation",
        "test",
    }
    assert sources.splits_in_memory({"train": 200, "validation": 40, "test": 40}, config) == {
        "train",
        "validation",
        "test",
    }
    with pytest.raises(ValueError, match="memory_cache_mib: expected an int >= 0"):
        DataConfig(memory_cache_mib=-1)


def test_pipeline_matches_serving_decode(tmp_path):
    root = badfiles.make_dataset(tmp_path, ("x", "y"), per_class=1, size=(40, 30))
    d = load(root, image_size=(16, 16), validation_split=0.0, test_split=0.0)
    images, labels = take_all(d.train)
    for image, label in zip(images, labels, strict=True):
        name = d.class_names[label]
        path = next((root / name).iterdir())
        served = data.decode_image(tf.io.read_file(str(path)), (16, 16))
        np.testing.assert_array_equal(image, served.numpy().astype(np.float32))


def test_summary_and_to_dict(tmp_path):
    root, _ = badfiles.make_messy_dataset(tmp_path / "m", per_class=100, size=(16, 16))
    d = load(root, **SMALL)
    record = json.loads(json.dumps(d.to_dict()))
    assert record["class_names"] == ["cats", "dogs"] and record["ignored"] > 0
    assert {"path": "cats/zero_bytes.jpg", "reason": "zero-byte file"} in record["skipped"]
    text = d.summary()
    for needle in ("cats", "validation", "zero-byte file", "decompression bomb", "GIF named .jpg"):
        assert needle in text
    assert len(text.splitlines()) < 60


# ------------------------------------------------------------------------------------------------
# Bad files


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root, expected = badfiles.make_messy_dataset(tmp_path_factory.mktemp("messy"), size=(16, 16))
    return load(root, **SMALL), expected


@pytest.mark.parametrize("case", badfiles.CASES, ids=lambda c: c.name)
def test_every_bad_file_kind(messy, case):
    d, _ = messy
    path = f"cats/{case.name}"
    reasons = {s.path: s.reason for s in d.skipped}
    if case.expect in (badfiles.DECODED, badfiles.IGNORED):
        assert path not in reasons
    else:
        assert case.expect in reasons[path]


def test_messy_folder_counts(messy):
    d, expected = messy
    decoded = sum(v == badfiles.DECODED for v in expected.values())
    assert sum(d.counts[s]["cats"] for s in d.counts) == 120 + decoded
    assert len(d.skipped) == len(badfiles.BAD_CASES)
    # ignored: 4 inside cats (.DS_Store, Thumbs.db, ._*, .hidden_dir) + 3 at the root
    assert d.ignored == 7
    notes = {n.path: n.reason for n in d.notes}
    assert "first frame" in notes["cats/animated.gif"]
    assert "alpha dropped" in notes["cats/rgba.png"] and "CMYK" in notes["cats/cmyk.jpg"]
    x, _ = take_all(d.train)  # a full epoch over the survivors: no crash
    assert np.isfinite(x).all()


@pytest.mark.parametrize("case", badfiles.DECODED_CASES, ids=lambda c: c.name)
def test_decoded_kinds_are_rgb(tmp_path, case):
    path = tmp_path / case.name
    path.write_bytes(case.make())
    assert data.check_image_file(path)[0] is None
    image = data.decode_image(tf.io.read_file(str(path)), (8, 8))
    assert image.shape == (8, 8, 3) and image.dtype == tf.uint8


def test_caps_from_config(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(badfiles.encode(badfiles.picture((100, 100)), "PNG"))
    assert "image too large: 100x100" in data.check_image_file(path, DataConfig(max_pixels=5000))[0]
    assert "file too large" in data.check_image_file(path, DataConfig(max_file_bytes=100))[0]


def test_unreadable_file_is_skipped(tmp_path, monkeypatch):
    path = tmp_path / "a.jpg"
    path.write_bytes(b"\xff\xd8\xff")
    real_open = open

    def deny(p, *args, **kwargs):
        if str(p) == str(path):
            raise PermissionError(13, "Permission denied")
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr("builtins.open", deny)
    assert data.check_image_file(path)[0] == "unreadable: Permission denied"


def test_scan_progress_without_a_terminal_is_plain_lines(tmp_path, monkeypatch, capsys):
    root = badfiles.make_dataset(tmp_path, ("x", "y"), per_class=6, size=(8, 8))
    monkeypatch.setattr(data, "PROGRESS_MIN_FILES", 10)
    monkeypatch.setattr(progress, "SHOW_AFTER_S", 0.0)
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    load(root, **SMALL)
    out = capsys.readouterr().out  # captured: not a terminal
    assert "Checking 12 image files" in out and "12/12 files (100 %)" in out
    assert "\x1b" not in out and "\r" not in out


@pytest.mark.parametrize("chunk", [1, 3, 256])
def test_the_fast_scan_names_every_bad_file_as_the_one_file_check_does(
    tmp_path, monkeypatch, chunk
):
    root, _ = badfiles.make_messy_dataset(tmp_path, size=(16, 16))
    monkeypatch.setattr(data, "SCAN_CHUNK", chunk)  # several header tasks and decode batches
    paths = [p for p in data.walk_files(str(root))[0] if "/." not in p]
    ok, skipped, notes = data.scan_files(paths, DataConfig(), root)
    one_by_one = {os.path.relpath(p, root): data.check_image_file(p) for p in paths}
    assert {s.path: s.reason for s in skipped} == {
        k: reason for k, (reason, _) in one_by_one.items() if reason is not None
    }
    assert {n.path: n.reason for n in notes} == {
        k: note for k, (reason, note) in one_by_one.items() if reason is None and note
    }
    assert ok.sum() == sum(reason is None for reason, _ in one_by_one.values())
    assert len(skipped) >= len(badfiles.BAD_CASES)


def test_max_bad_fraction(tmp_path):
    root = badfiles.make_dataset(tmp_path, ("x", "y"), per_class=10, size=(16, 16))
    badfiles.write_cases(root / "x", badfiles.BAD_CASES[:5])
    with pytest.raises(ValueError, match=r"5 of 25 .*zero-byte file") as info:
        load(root, **SMALL)
    assert "10%" in str(info.value)
    d = load(root, max_bad_fraction=0.25, **SMALL)
    assert len(d.skipped) == 5


# ------------------------------------------------------------------------------------------------
# Folder errors


def test_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="no such file or directory"):
        load(str(tmp_path / "nope"))


def test_file_is_not_a_folder(tmp_path):
    (tmp_path / "f.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="expected a folder"):
        load(tmp_path / "f.jpg")


def test_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="empty folder"):
        load(tmp_path)


def test_loose_images_without_class_folders(tmp_path):
    badfiles.write_cases(tmp_path, badfiles.DECODED_CASES[:3])
    with pytest.raises(ValueError, match="one subfolder per class.*3 files"):
        load(tmp_path)


def test_class_folders_without_images(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / ".DS_Store").write_bytes(b"x")
    with pytest.raises(ValueError, match="expected image files"):
        load(tmp_path)


def test_single_class(tmp_path):
    badfiles.make_dataset(tmp_path, ("only",), per_class=5)
    with pytest.raises(ValueError, match="at least 2 classes"):
        load(tmp_path)


def test_empty_class_folder_is_left_out_with_warning(tmp_path):
    badfiles.make_dataset(tmp_path, ("a", "b"), per_class=10)
    (tmp_path / "empty").mkdir()
    d = load(tmp_path, **SMALL)
    assert d.class_names == ["a", "b"]
    assert (
        any("'empty'" in w for w in d.warnings) and "warning: class folder 'empty'" in d.summary()
    )


def test_unreadable_folder(tmp_path, monkeypatch):
    badfiles.make_dataset(tmp_path, ("a", "b"), per_class=2)

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(ValueError, match="readable folder.*Permission denied"):
        load(tmp_path)


def test_non_ascii_and_space_class_names(tmp_path):
    badfiles.make_dataset(tmp_path, ("abeille à miel", "fourmi rousse", "蜂"), per_class=10)
    d = load(tmp_path, **SMALL)
    assert d.class_names == ["abeille à miel", "fourmi rousse", "蜂"]
    _, y = take_all(d.train)
    assert sorted(set(y.tolist())) == [0, 1, 2]


def test_bad_source_type():
    with pytest.raises(TypeError, match="expected a folder path"):
        load(42)


# ------------------------------------------------------------------------------------------------
# The shared real photos


@pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason=f"shared data not found at {HYMENOPTERA}")
def test_real_hymenoptera_folder():
    d = load(HYMENOPTERA, image_size=(32, 32), batch_size=64)
    assert d.class_names == ["ants", "bees"]
    assert d.skipped == []  # every file decodes, the GIF included
    assert sum(sum(c.values()) for c in d.counts.values()) == 245
    assert d.counts["test"] == {"ants": 25, "bees": 24}
    gif = HYMENOPTERA / "ants" / "imageNotFound.gif"
    # The one GIF (honestly named): used, and listed as converted (palette -> RGB).
    assert data.check_image_file(gif) == (None, "decoded as GIF: palette (indexed colours) → RGB")
    assert [n.path for n in d.notes] == ["ants/imageNotFound.gif"]
    x, _ = take_all(d.test)
    assert x.shape == (49, 32, 32, 3)
