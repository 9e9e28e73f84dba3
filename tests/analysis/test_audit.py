"""Tests for tlkeras.analysis.audit (near-duplicates, leaks, suspected mislabels), ImageData.items/ordered,
and scripts/audit.py."""

from __future__ import annotations

import json
import os
import shutil

import badfiles
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, check_bad_flags_fail_in_one_line, run_python

from tlkeras.analysis import audit, audit_probes
from tlkeras.analysis.audit_probes import audit_features
from tlkeras.analysis.audit_result import DEFAULT_DUPLICATE_THRESHOLD, AuditConfig
from tlkeras.data import decode_image, load

AUDIT = REPO / "scripts" / "audit.py"
CLASSES = ["a", "b", "c"]


def clusters(per_class=(30, 30, 30), dim=64, seed=0):
    """Features of well-separated classes: class centres far apart, each image its own noise, so
    two different images are never near-duplicates (cosine ~0.7 within a class)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.5, (len(per_class), dim))
    y = np.repeat(np.arange(len(per_class)), per_class)
    return centres[y] + rng.normal(0.0, 1.0, (len(y), dim)), y


def as_splits(x, y, labels=None, seed=0):
    """A 60/20/20 train/validation/test split stratified by ``y``, with ``"index i"`` items;
    ``labels`` (default ``y``) are the labels returned."""
    labels = y if labels is None else labels
    order = np.random.default_rng(seed).permutation(len(y))
    order = order[np.argsort(y[order], kind="stable")]  # per class, a random order
    part = np.zeros(len(y), int)
    for k in np.unique(y):
        rows = order[y[order] == k]
        part[rows[: len(rows) // 5]] = 1
        part[rows[len(rows) // 5 : 2 * len(rows) // 5]] = 2
    splits = ("train", "validation", "test")
    rows = {s: np.flatnonzero(part == k) for k, s in enumerate(splits)}
    return (
        {s: x[r] for s, r in rows.items()},
        {s: labels[r] for s, r in rows.items()},
        {s: [f"index {i}" for i in r] for s, r in rows.items()},
    )


# --------------------------------------------------------------------------------------------
# AuditConfig


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"duplicate_threshold": 0}, "duplicate_threshold: expected a number in \\(0, 1\\]"),
        ({"duplicate_threshold": 1.5}, "received 1.5"),
        ({"duplicate_threshold": "high"}, "duplicate_threshold"),
        ({"mislabel_confidence": -0.1}, "mislabel_confidence"),
        ({"folds": 1}, "folds: expected an int >= 2, received 1"),
        ({"folds": 2.5}, "folds"),
        ({"max_pairs": -1}, "max_pairs"),
        ({"probe_c": 0}, "probe_c: expected a positive number or None"),
        ({"seed": True}, "seed"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AuditConfig(**kwargs)


# --------------------------------------------------------------------------------------------
# audit_features


def test_a_clean_set_reports_nothing():
    x, y = clusters()
    result = audit_features(*as_splits(x, y), CLASSES)
    assert (result.leak_count, result.duplicate_count, result.mislabel_count) == (0, 0, 0)
    assert result.leaks == result.duplicates == result.mislabels == []
    check = result.mislabel_check
    assert check["done"] and check["judged"] == 90 and check["accuracy"] == 1.0
    assert result.splits == {"train": 54, "validation": 18, "test": 18}
    assert "0 pairs across splits" in result.summary()


def test_a_duplicate_across_splits_is_a_leak_naming_both_splits(tmp_path):
    x, y = clusters()
    feats, labels, items = as_splits(x, y)
    # A re-encoded copy of a training image in the test split (tiny feature noise), and an exact
    # copy inside the training split.
    copy = feats["train"][7] + np.random.default_rng(1).normal(0, 0.01, x.shape[1])
    feats["test"] = np.vstack([feats["test"], copy])
    labels["test"] = np.append(labels["test"], labels["train"][7])
    items["test"].append("copy of train 7")
    feats["train"] = np.vstack([feats["train"], feats["train"][3]])
    labels["train"] = np.append(labels["train"], labels["train"][3])
    items["train"].append("copy of train 3")

    result = audit_features(feats, labels, items, CLASSES, AuditConfig(max_pairs=5))
    assert result.leak_count == 1 and result.leaks_by_splits == {"train/test": 1}
    assert result.leaked_items == {"train": 1, "test": 1}
    leak = result.leaks[0]
    assert leak["leak"] and leak["splits"] == ["train", "test"] and leak["similarity"] > 0.99
    assert leak["a"]["item"] == items["train"][7] and leak["b"]["item"] == "copy of train 7"
    assert not leak["labels_differ"]
    assert result.duplicate_count == 1
    dup = result.duplicates[0]
    assert not dup["leak"] and dup["identical"] and dup["splits"] == ["train", "train"]
    assert {dup["a"]["item"], dup["b"]["item"]} == {items["train"][3], "copy of train 3"}
    assert result.mislabel_count == 0
    text = result.summary()
    assert "LEAK" in text and "train/test 1" in text and "copy of train 7" in text

    record = json.loads(result.write_json(tmp_path / "out" / "audit.json").read_text())
    assert record["leak_count"] == 1 and record["leaks"][0]["b"]["split"] == "test"
    assert record["config"]["duplicate_threshold"] == DEFAULT_DUPLICATE_THRESHOLD
    assert record["num_images"] == 92 and len(record["checked"]) == 2


def test_a_swapped_label_is_a_suspected_mislabel():
    x, y = clusters()
    feats, labels, items = as_splits(x, y)
    labels["train"][4] = (labels["train"][4] + 1) % 3  # one image filed under the wrong class
    result = audit_features(feats, labels, items, CLASSES)
    assert result.mislabel_count == 1 and result.leak_count == result.duplicate_count == 0
    suspect = result.mislabels[0]
    assert suspect["split"] == "train" and suspect["item"] == items["train"][4]
    assert suspect["label"] == CLASSES[labels["train"][4]]
    assert suspect["predicted"] == CLASSES[y[int(items["train"][4].split()[1])]]
    assert suspect["confidence"] >= 0.9 and suspect["label_probability"] < 0.1
    assert "labelled" in result.summary() and "probe says" in result.summary()


def test_multilabel_skips_the_mislabel_part_with_a_reason():
    x, y = clusters((10, 10, 10))
    multi = np.eye(3)[y]
    multi[::3, 0] = 1
    result = audit_features(*as_splits(x, y, multi), CLASSES)
    assert not result.mislabel_check["done"] and "multi-label" in result.mislabel_check["reason"]
    assert "not checked (multi-label" in result.summary()


def test_small_classes_are_not_judged():
    x, y = clusters((20, 20, 3))
    result = audit_features({"train": x}, {"train": y}, {"train": list(range(len(y)))}, CLASSES)
    assert result.mislabel_check["judged"] == 40
    assert result.mislabel_check["classes_not_judged"] == ["c (3)"]


def test_blocked_pairs_equal_the_full_matrix():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    x[30] = x[2]
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    full = x @ x.T
    expected = {(i, j) for i, j in zip(*np.nonzero(full >= 0.6), strict=True) if i < j}
    found = set()
    for i, j, s in audit_probes.similar_pairs(x, 0.6, block_elements=120):  # 2 rows per block
        found |= set(zip(i.tolist(), j.tolist(), strict=True))
        np.testing.assert_allclose(s, full[i, j], rtol=1e-6)
    assert found == expected and (2, 30) in found


def test_inputs_are_checked():
    x, y = clusters((10, 10, 10))
    with pytest.raises(ValueError, match="expected the splits"):
        audit_features({"train": x}, {"test": y}, {"train": list(range(30))}, CLASSES)
    with pytest.raises(ValueError, match="as many labels and items"):
        audit_features({"train": x}, {"train": y}, {"train": ["one"]}, CLASSES)
    with pytest.raises(ValueError, match="pooled features"):
        audit_features({"train": x[:, :, None]}, {"train": y}, {"train": list(range(30))}, CLASSES)
    with pytest.raises(TypeError, match="AuditConfig"):
        audit_features({"train": x}, {"train": y}, {"train": list(range(30))}, CLASSES, {})


# --------------------------------------------------------------------------------------------
# ImageData.items / ordered, and audit() on images


def test_items_and_ordered_follow_the_split_for_arrays():
    y = np.repeat([0, 1], 20)
    x = np.zeros((40, 4, 4, 3), np.uint8)
    x[:, 0, 0, 0] = np.arange(40)  # pixel (0, 0) is the example's row
    d = load((x, y), image_size=(4, 4), batch_size=8, validation_split=0.2, test_split=0.2)
    for split in ("train", "validation", "test"):
        ids, labels = [], []
        for images, batch_labels in d.ordered(split):
            ids += images.numpy()[:, 0, 0, 0].astype(int).tolist()
            labels += batch_labels.numpy().tolist()
        assert d.items[split] == [f"index {i}" for i in ids]
        # Evaluation splits keep the pool's order; train is permuted once (tlkeras.data.load).
        assert (ids == sorted(ids)) == (split != "train") and labels == y[ids].tolist()
        assert len(ids) == sum(d.counts[split].values())
    shuffled = [int(v) for images, _ in d.train for v in images.numpy()[:, 0, 0, 0]]
    ordered = [int(item.split()[1]) for item in d.items["train"]]
    assert sorted(shuffled) == sorted(ordered) and shuffled != ordered  # train itself reshuffles
    with pytest.raises(ValueError, match="split: expected one of"):
        d.ordered("val")


def test_items_and_ordered_follow_the_split_for_a_folder(tmp_path):
    root = badfiles.make_dataset(tmp_path / "d", ("x", "y"), per_class=6, size=(20, 20))
    d = load(root, image_size=(16, 16), batch_size=4, validation_split=0.25, test_split=0.25)
    assert d.validation is d.ordered("validation")
    for split in ("train", "validation", "test"):
        images = np.concatenate([x.numpy() for x, _ in d.ordered(split)])
        labels = np.concatenate([y.numpy() for _, y in d.ordered(split)])
        assert len(d.items[split]) == len(images) == sum(d.counts[split].values())
        for item, image, label in zip(d.items[split], images, labels, strict=True):
            assert item.split(os.sep)[0] == d.class_names[label]
            expected = decode_image(tf.io.read_file(str(root / item)), (16, 16)).numpy()
            np.testing.assert_array_equal(image, expected.astype(np.float32))
    assert sorted(i for s in d.items.values() for i in s) == sorted(
        str(p.relative_to(root)) for p in root.glob("*/*")
    )


def pixel_noise(images):
    """A stand-in embedding: differences between neighbouring rows, centred. The pictures' shared
    tint and ramp cancel out; what is left is each picture's own noise."""
    rows = images[:, 1:] - images[:, :-1]
    flat = tf.reshape(rows, [tf.shape(images)[0], -1])
    return flat - tf.reduce_mean(flat, axis=1, keepdims=True)


def test_audit_finds_a_copied_file_across_split_folders(tmp_path):
    for split, seed in (("train", 0), ("test", 1)):
        badfiles.make_dataset(tmp_path / split, ("x", "y"), per_class=6, size=(16, 16), seed=seed)
    shutil.copy(tmp_path / "train" / "y" / "y_0002.jpg", tmp_path / "test" / "y" / "again.jpg")
    d = load(tmp_path, image_size=(16, 16), batch_size=4, validation_split=0.0)
    result = audit.audit(d, pixel_noise, AuditConfig(folds=3))
    assert result.leak_count == 1 and result.duplicate_count == 0
    leak = result.leaks[0]
    assert leak["identical"] and leak["splits"] == ["train", "test"]
    assert (leak["a"]["item"], leak["b"]["item"]) == (
        os.path.join("train", "y", "y_0002.jpg"),
        os.path.join("test", "y", "again.jpg"),
    )
    assert result.source == str(tmp_path) and result.data["counts"]["test"]["y"] == 7
    with pytest.raises(ValueError, match="pooled features"):
        audit.audit(d, lambda images: images)  # a feature map, not pooled features


def _copied_file_data(tmp_path):
    for split, seed in (("train", 0), ("test", 1)):
        badfiles.make_dataset(tmp_path / split, ("x", "y"), per_class=6, size=(16, 16), seed=seed)
    shutil.copy(tmp_path / "train" / "y" / "y_0002.jpg", tmp_path / "test" / "y" / "again.jpg")
    return load(tmp_path, image_size=(16, 16), batch_size=4, validation_split=0.0)


def _test_features(d):
    batches = [(pixel_noise(images), labels) for images, labels in d.ordered("test")]
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def test_given_features_are_used_as_computed_and_checked(tmp_path):
    d = _copied_file_data(tmp_path)
    embedded = audit.audit(d, pixel_noise, AuditConfig(folds=3))
    x, y = _test_features(d)
    calls = []

    def counting(images):
        calls.append(len(images))
        return pixel_noise(images)

    given = audit.audit(d, counting, AuditConfig(folds=3), features={"test": (x, y)})
    assert sum(calls) == sum(d.counts["train"].values())  # only train was embedded
    assert given.to_dict() | {"seconds": 0} == embedded.to_dict() | {"seconds": 0}
    with pytest.raises(ValueError, match=r"features\['test'\]: expected 13 rows"):
        audit.audit(d, pixel_noise, features={"test": (x[:5], y[:5])})


@pytest.mark.parametrize("given", [False, True])
def test_past_max_images_every_kth_image_of_each_split_is_audited(tmp_path, given):
    d = _copied_file_data(tmp_path)  # 12 train + 13 test images
    x, y = _test_features(d)
    features = {"test": (x, y)} if given else None
    result = audit.audit(d, pixel_noise, AuditConfig(folds=2, max_images=10), features=features)
    assert result.sampled == {"every": 3, "images": 4 + 5, "of": 25}
    assert result.splits == {"train": 4, "test": 5}
    assert "sampled: every 3th image of each split, 9 of 25" in result.summary()
    assert any("a sample: every 3th image" in line for line in result.to_dict()["checked"])
    # The sample is every third item of each split's order (the pairs name them).
    everything = audit.audit(d, pixel_noise, AuditConfig(folds=2, max_images=0))
    assert everything.sampled == {} and everything.num_images == 25
    with pytest.raises(ValueError, match="max_images: expected an int >= 0"):
        AuditConfig(max_images=-1)


# --------------------------------------------------------------------------------------------
# scripts/audit.py


def _env(tmp_path):
    return {**os.environ, "KERAS_HOME": str(tmp_path / "keras_home"), "TF_CPP_MIN_LOG_LEVEL": "3"}


@pytest.mark.slow
def test_audit_script_prints_the_findings_and_writes_audit_json(tmp_path):
    root = tmp_path / "data"
    for split, seed in (("train", 0), ("test", 1)):
        badfiles.make_dataset(root / split, ("x", "y"), per_class=8, size=(32, 32), seed=seed)
    shutil.copy(root / "train" / "x" / "x_0001.jpg", root / "test" / "x" / "leaked.jpg")
    out = tmp_path / "report" / "audit.json"
    proc = run_python(
        AUDIT,
        f"--data={root}",
        "--backbone_kwargs=alpha=0.25",
        "--weights=none",
        "--image_size=32",
        "--folds=3",
        "--validation_split=0.25",
        f"--output={out}",
        env=_env(tmp_path),
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("audit of ") and f"wrote {out}" in proc.stdout
    record = json.loads(out.read_text())
    assert record["splits"] == {"train": 12, "validation": 4, "test": 17}
    assert record["embedding"]["backbone"] == "MobileNet"
    assert record["embedding"]["image_size"] == [32, 32] and record["embedding"]["weights"] is None
    assert record["config"]["folds"] == 3 and record["mislabel_check"]["done"]
    # Random features call many tinted pictures similar; the copied file is an identical leak.
    copied = os.path.join("train", "x", "x_0001.jpg"), os.path.join("test", "x", "leaked.jpg")
    identical = [(p["a"]["item"], p["b"]["item"]) for p in record["leaks"] if p["identical"]]
    assert copied in identical and record["leak_count"] >= 1
    assert "LEAK 1.0000" in proc.stdout


def test_audit_script_bad_flags_fail_in_one_line(tmp_path):
    cases = {
        "threshold": (["--data=digits", "--duplicate_threshold=1.5"], "duplicate_threshold"),
        "missing_folder": (["--data=/no/such/folder"], "/no/such/folder"),
    }
    check_bad_flags_fail_in_one_line(AUDIT, cases, _env(tmp_path))
