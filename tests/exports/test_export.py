"""tlkeras.export (savedmodel, signatures, layout, verify, exported): SavedModels TF Serving serves unchanged, verified, written atomically."""

from __future__ import annotations

import json
import signal
import subprocess
import textwrap

import badfiles
import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import (
    HYMENOPTERA,
    MOBILENET_WEIGHTS,
    needs_hymenoptera,
    needs_shared_weights,
    run_python,
)
from tensorflow.core.framework import tensor_pb2

import tlkeras
from tlkeras import data as data_lib
from tlkeras.analysis import calibration
from tlkeras.data import decoding
from tlkeras.exports import layout, savedmodel, signatures, verify
from tlkeras.exports import loading as exported

SIZE = (32, 32)


def tiny_model(units: int = 3, activation: str | None = "softmax", seed: int = 0) -> keras.Model:
    """Input 32×32×3 (0–255) → Rescaling → Conv → GAP → Dense named ``predictions``."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((*SIZE, 3), name="image")
    x = keras.layers.Rescaling(1 / 255.0, name="rescale")(inputs)
    x = keras.layers.Conv2D(4, 3, name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(units, activation=activation, name="predictions")(x)
    return keras.Model(inputs, outputs, name="tiny")


def jpegs(n: int = 3, size: tuple[int, int] = (40, 56)) -> list[bytes]:
    return [
        badfiles.encode(badfiles.picture(size, badfiles.COLOURS[i % 5], seed=i), "JPEG")
        for i in range(n)
    ]


def pixels_of(images: list[bytes]) -> np.ndarray:
    """The training pipeline's decoding (tlkeras.data) of ``images`` as float32."""
    return np.stack([data_lib.decode_image(tf.constant(b), SIZE).numpy() for b in images]).astype(
        "float32"
    )


# --------------------------------------------------------------------------------------------------
# Heads: probabilities, classes and scores for every task.

HEADS = {
    "multiclass": (dict(units=3, activation="softmax"), {}, lambda y: y),
    "multiclass_logits": (
        dict(units=3, activation=None),
        {},
        lambda y: tf.nn.softmax(y).numpy(),
    ),
    "binary": (dict(units=1, activation="sigmoid"), {}, lambda y: np.concatenate([1 - y, y], -1)),
    "binary_logits": (
        dict(units=1, activation=None),
        {"task": "binary"},
        lambda y: np.concatenate([1 - tf.sigmoid(y), tf.sigmoid(y)], -1),
    ),
    "multilabel": (dict(units=3, activation="sigmoid"), {}, lambda y: y),
}


@pytest.mark.parametrize("head", sorted(HEADS))
def test_signatures_give_probabilities_classes_scores(tmp_path, head):
    model_kwargs, export_kwargs, to_probs = HEADS[head]
    model = tiny_model(**model_kwargs)
    names = ["cat", "dog"] if model_kwargs["units"] == 1 else ["ant", "bee", "wasp"]
    result = savedmodel.export(
        model, "m", base_dir=tmp_path, class_names=names, verify=False, top_k=2, **export_kwargs
    )
    assert result.path == tmp_path / "m" / "1" and result.version == 1
    assert result.signatures == (signatures.BYTES_SIGNATURE, signatures.FLOAT_SIGNATURE)

    loaded = exported.load_exported(tmp_path / "m")
    images = jpegs()
    pixels = pixels_of(images)
    expected = np.asarray(to_probs(model.predict(pixels, verbose=0)), "float32")
    for out in (loaded.predict_pixels(pixels), loaded.predict_bytes(images)):
        np.testing.assert_allclose(out["probabilities"], expected, atol=1e-5)
        order = np.argsort(-expected, axis=-1, kind="stable")[:, :2]
        np.testing.assert_allclose(
            out["scores"], np.take_along_axis(expected, order, -1), atol=1e-5
        )
        # Each returned class name carries the score it is listed with.
        for row in range(len(images)):
            for name, score in zip(out["classes"][row], out["scores"][row], strict=True):
                assert abs(expected[row, names.index(name.decode())] - score) < 1e-5
    task = signatures.resolve_head(model, export_kwargs.get("task"), None).task
    assert loaded.metadata["task"] == task
    if task == "multiclass" or task == "binary":
        np.testing.assert_allclose(expected.sum(-1), 1.0, atol=1e-5)


def test_export_layout_metadata_warmup_and_fresh_process_verification(tmp_path):
    model = tiny_model()
    images = jpegs(3) + [badfiles.encode(badfiles.picture((20, 30)), "PNG")]
    result = savedmodel.export(
        model,
        "flowers",
        base_dir=tmp_path,
        class_names=["daisy", "rose", "tulip"],
        metadata={"metrics": {"test_accuracy": 0.5}},
        warmup_images=images,
    )
    path = result.path
    assert sorted(p.name for p in (tmp_path / "flowers").iterdir()) == ["1"]  # no temporaries left
    assert (path / "saved_model.pb").is_file() and (path / "variables").is_dir()
    extra = path / layout.ASSETS_EXTRA
    assert (extra / layout.LABELS_FILE).read_text().splitlines() == ["daisy", "rose", "tulip"]

    meta = json.loads((extra / layout.METADATA_FILE).read_text())
    assert meta["class_names"] == ["daisy", "rose", "tulip"]
    assert meta["input_size"] == [32, 32] and meta["task"] == "multiclass"
    assert meta["metrics"] == {"test_accuracy": 0.5}
    assert set(meta["versions"]) == {"tlkeras", "keras", "tensorflow"}
    assert meta["verification"]["ok"] is True

    report = result.verification
    assert report["num_images"] == len(images)
    assert report["serving_float_max_abs_diff"] <= verify.FLOAT_TOLERANCE
    assert report["serving_default_max_abs_diff"] <= verify.BYTES_TOLERANCE
    assert report["signatures"][signatures.BYTES_SIGNATURE]["inputs"] == {
        "image_bytes": ["string", [None]]
    }
    assert report["signatures"][signatures.FLOAT_SIGNATURE]["inputs"] == {
        "images": ["float32", [None, 32, 32, 3]]
    }

    logs = savedmodel.read_warmup_requests(extra / layout.WARMUP_FILE)
    assert len(logs) == len(images)
    for log, image in zip(logs, images, strict=True):
        request = log.predict_log.request
        assert request.model_spec.name == "flowers"
        assert request.model_spec.signature_name == signatures.BYTES_SIGNATURE
        # Our private proto pool has its own TensorProto class: read it through the wire format.
        proto = tensor_pb2.TensorProto.FromString(request.inputs["image_bytes"].SerializeToString())
        tensor = tf.make_ndarray(proto)
        assert tensor.tolist() == [image]

    cli = subprocess.run(
        ["saved_model_cli", "show", "--all", "--dir", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    for text in (
        "signature_def['serving_default']",
        "signature_def['serving_float']",
        "inputs['image_bytes']",
        "inputs['images']",
        "shape: (-1, 32, 32, 3)",
        "outputs['classes']",
        "outputs['probabilities']",
        "outputs['scores']",
    ):
        assert text in cli.stdout


def test_warmup_records_parse_with_tensorflow_serving_protos(tmp_path):
    pytest.importorskip(
        "tensorflow_serving.apis.prediction_log_pb2",
        reason="tensorflow-serving-api not installed (records are checked with our own protos)",
    )
    from tensorflow_serving.apis import prediction_log_pb2

    images = jpegs(2)
    path = savedmodel.write_warmup_requests(tmp_path / "warmup", "m", images)
    for record, image in zip(tf.data.TFRecordDataset(str(path)), images, strict=True):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        assert log.WhichOneof("log_type") == "predict_log"
        tensor = tf.make_ndarray(log.predict_log.request.inputs["image_bytes"])
        assert tensor.tolist() == [image]


def test_verification_catches_a_model_that_does_not_match(tmp_path):
    result = savedmodel.export(
        tiny_model(seed=0), "m", base_dir=tmp_path, class_names=["a", "b", "c"], verify=False
    )
    with pytest.raises(verify.ExportVerificationError, match="max abs difference"):
        verify.verify_export(result.path, tiny_model(seed=1), jpegs(2))


def test_a_pre_started_verifier_checks_the_export_and_is_consumed(tmp_path):
    model = tiny_model(seed=0)
    result = savedmodel.export(model, "m", base_dir=tmp_path, class_names=["a", "b", "c"])
    assert result.verification["ok"]  # export() pre-starts its verifier
    process = verify.start_verifier()
    report = verify.verify_export(result.path, model, jpegs(2), process=process)
    # Its report is taken as soon as it is printed; the child is then ended, not awaited.
    assert report["ok"] and report["num_images"] == 2 and process.poll() is not None
    # A verifier whose export failed before handing over work ends quietly on an empty line.
    idle = verify.start_verifier()
    assert idle.communicate("", timeout=120)[0] == "" and idle.returncode == 0


def test_a_verifier_started_with_the_run_is_the_one_the_export_uses():
    verify.prestart_verifier()
    waiting = verify._prestarted
    verify.prestart_verifier()  # one waits at a time
    assert verify._prestarted is waiting and waiting.poll() is None
    assert verify.start_verifier() is waiting and verify._prestarted is None
    fresh = verify.start_verifier()  # nothing pre-started any more: a new one
    assert fresh is not waiting
    for process in (waiting, fresh):
        process.stdin.close()
        assert process.wait(timeout=120) == 0
    # Unused at exit: told to quit (the atexit hook), it ends without verifying anything.
    verify.prestart_verifier()
    unused = verify._prestarted
    verify._discard(unused)
    assert unused.wait(timeout=120) == 0


def test_an_export_that_fails_leaves_no_verifier_behind(tmp_path, monkeypatch):
    started = []
    real = savedmodel.start_verifier
    monkeypatch.setattr(savedmodel, "start_verifier", lambda: started.append(real()) or started[-1])

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(savedmodel, "write_warmup_requests", broken)
    with pytest.raises(OSError, match="disk full"):
        savedmodel.export(tiny_model(), "m", base_dir=tmp_path, class_names=["a", "b", "c"])
    assert len(started) == 1 and started[0].poll() is not None
    assert not any((tmp_path / "m").iterdir())


def test_an_export_verifies_in_its_child_while_the_caller_works(tmp_path):
    model = tiny_model(seed=0)
    pending = savedmodel.export(
        model, "m", base_dir=tmp_path, class_names=["a", "b", "c"], wait=False
    )
    final = pending.result.path
    assert final == tmp_path / "m" / "1" and not final.exists()  # not in place before verified
    child = pending.checking.process
    assert child.poll() is None  # the child is checking it now
    result = pending.finish()
    assert result.path == final and result.verification["ok"] and child.poll() is not None
    metadata = json.loads((final / layout.ASSETS_EXTRA / layout.METADATA_FILE).read_text())
    assert metadata["verification"]["ok"]
    # Dropped instead (the caller failed meanwhile): no version, no temporary, no child.
    dropped = savedmodel.export(
        model, "m", base_dir=tmp_path, class_names=["a", "b", "c"], wait=False
    )
    dropped.cancel()
    assert dropped.checking.process.poll() is not None
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1"]


# --------------------------------------------------------------------------------------------------
# Versions: next free number, never overwritten unless asked, atomic.


def test_versions_are_numbered_and_never_silently_overwritten(tmp_path):
    model = tiny_model()
    assert layout.next_version(tmp_path, "m") == 1
    first = savedmodel.export(
        model, "m", base_dir=tmp_path, class_names=["a", "b", "c"], verify=False
    )
    second = savedmodel.export(
        model, "m", base_dir=tmp_path, class_names=["a", "b", "c"], verify=False
    )
    assert (first.version, second.version) == (1, 2)
    assert layout.next_version(tmp_path, "m") == 3
    with pytest.raises(FileExistsError, match="already exists"):
        savedmodel.export(
            model, "m", base_dir=tmp_path, class_names=["a", "b", "c"], version=1, verify=False
        )
    savedmodel.export(
        model,
        "m",
        base_dir=tmp_path,
        class_names=["x", "y", "z"],
        version=1,
        overwrite=True,
        verify=False,
    )
    assert exported.load_exported(tmp_path / "m" / "1").class_names == ["x", "y", "z"]
    assert exported.load_exported(tmp_path / "m").version == 2  # highest version by default
    assert exported.load_exported(tmp_path / "m", version=1).version == 1
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "2"]


KILL_MID_WRITE = textwrap.dedent(
    """
    import os, signal, sys
    import keras
    from tlkeras.exports import savedmodel

    def die(*args, **kwargs):  # the SavedModel is on disk, the version not yet in place
        os.kill(os.getpid(), signal.SIGKILL)

    savedmodel.write_warmup_requests = die
    inputs = keras.Input((32, 32, 3))
    outputs = keras.layers.Dense(2, activation="softmax", name="predictions")(
        keras.layers.GlobalAveragePooling2D()(inputs))
    savedmodel.export(keras.Model(inputs, outputs), "m", base_dir=sys.argv[1],
                      class_names=["a", "b"], verify=False)
    """
)


def test_export_killed_mid_write_leaves_no_version_directory(tmp_path):
    model = tiny_model(units=2)
    savedmodel.export(model, "m", base_dir=tmp_path, class_names=["a", "b"], verify=False)
    proc = run_python("-c", KILL_MID_WRITE, tmp_path, text=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    (tmp,) = [p for p in (tmp_path / "m").iterdir() if p.name != "1"]
    assert tmp.name.startswith(".tmp-export-")  # hidden and non-numeric: TF Serving ignores it
    assert (tmp / "saved_model.pb").is_file()  # it really was killed mid-write
    assert exported.load_exported(tmp_path / "m").version == 1  # the previous version still serves
    # The next export cleans the dead process's temporary and takes version 2.
    result = savedmodel.export(model, "m", base_dir=tmp_path, class_names=["a", "b"], verify=False)
    assert result.version == 2
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "2"]


# --------------------------------------------------------------------------------------------------
# The bytes signature's decoding: the training pipeline's, with caps checked before decoding.


@pytest.mark.parametrize("case", badfiles.DECODED_CASES, ids=lambda c: c.name)
def test_bytes_signature_decodes_what_training_decodes(case):
    data = case.make()
    got = decoding.decode_and_resize(tf.constant(data), SIZE).numpy()
    assert got.shape == (*SIZE, 3) and got.dtype == np.float32
    np.testing.assert_array_equal(got, pixels_of([data])[0])


@pytest.mark.parametrize("case", badfiles.BAD_CASES, ids=lambda c: c.name)
def test_bytes_signature_rejects_bad_files_with_a_clear_error(case):
    decode = tf.function(lambda x: decoding.decode_and_resize(x, SIZE), autograph=False)
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        decode(tf.constant(case.make()))
    message = exported.tf_error_message(info.value)
    assert message and "node" not in message.lower()
    if case.name == "bomb.png":
        assert "declares more than" in message
    if case.name == "zero_bytes.jpg":
        assert "empty" in message


def test_byte_cap_is_checked_in_the_graph():
    with pytest.raises(tf.errors.InvalidArgumentError, match="larger than 100 bytes"):
        decoding.decode_and_resize(tf.constant(jpegs(1)[0]), SIZE, max_bytes=100)


@pytest.mark.parametrize(
    "fmt,kwargs,mode",
    [
        ("JPEG", {}, "RGB"),
        ("PNG", {}, "RGB"),
        ("GIF", {}, "RGB"),
        ("BMP", {}, "RGB"),
        ("WEBP", {}, "RGB"),
        ("WEBP", {"lossless": True}, "RGB"),
        ("WEBP", {}, "RGBA"),  # VP8X extended header
    ],
)
def test_declared_pixels_read_from_every_supported_header(fmt, kwargs, mode):
    from PIL import Image

    data = badfiles.encode(Image.new(mode, (301, 123)), fmt, **kwargs)
    assert int(decoding._declared_pixels(tf.constant(data))) == 301 * 123


# --------------------------------------------------------------------------------------------------
# A calibration temperature in the signatures (tlkeras.analysis.calibration).


def test_temperature_is_applied_in_the_signatures_and_recorded(tmp_path):
    model, images = tiny_model(), jpegs(3)
    x = pixels_of(images)
    validation = {"temperature": 0.5, "ece_before": 0.2, "ece_after": 0.05}
    result = savedmodel.export(
        model,
        "m",
        base_dir=tmp_path,
        class_names=["a", "b", "c"],
        temperature=0.5,
        metadata={"calibration": {"validation": validation}},
        verify=False,
    )
    loaded = exported.load_exported(result.path)
    assert loaded.metadata["calibration"] == {"validation": validation, "temperature": 0.5}
    assert loaded.metadata["tta"] is None
    plain = model.predict(x, verbose=0)
    want = calibration.apply_temperature(plain, 0.5, "multiclass")
    assert np.abs(want - plain).max() > 1e-3  # the temperature really changes them
    for out in (loaded.predict_pixels(x), loaded.predict_bytes(images)):
        np.testing.assert_allclose(out["probabilities"], want, atol=1e-5)
        np.testing.assert_allclose(out["scores"][:, 0], want.max(axis=1), atol=1e-5)
        top = [c.decode() for c in out["classes"][:, 0]]
        assert top == ["abc"[i] for i in plain.argmax(axis=1)]  # argmax unchanged

    # A binary head: its sigmoid unit, served as [1 - p, p], scaled as calibration does it.
    binary = tiny_model(units=1, activation="sigmoid")
    result = savedmodel.export(
        binary, "b", base_dir=tmp_path, class_names=["x", "y"], temperature=3.0, verify=False
    )
    p = binary.predict(x, verbose=0)
    got = exported.load_exported(result.path).predict_pixels(x)["probabilities"]
    np.testing.assert_allclose(got[:, 1:], calibration.apply_temperature(p, 3.0, "binary"), 1e-5)


def test_temperature_and_tta_pass_the_fresh_process_verification(tmp_path):
    """The verifier's in-memory side serves the same way (``Head.served``): one verified export
    with both; the mean over the image and its mirror of each view's scaled probabilities."""
    model, images = tiny_model(), jpegs(3)
    result = savedmodel.export(
        model,
        "m",
        base_dir=tmp_path,
        class_names=["a", "b", "c"],
        temperature=0.5,
        tta="flip",
        warmup_images=images,
    )
    assert result.verification["ok"]
    assert result.verification["serving_float_max_abs_diff"] <= verify.FLOAT_TOLERANCE
    x = pixels_of(images)
    views = [x, x[:, :, ::-1, :]]
    scaled = [
        calibration.apply_temperature(model.predict(v, verbose=0), 0.5, "multiclass") for v in views
    ]
    loaded = exported.load_exported(result.path)
    assert loaded.metadata["tta"]["spec"] == "flip"
    np.testing.assert_allclose(
        loaded.predict_bytes(images)["probabilities"], np.mean(scaled, axis=0), atol=1e-5
    )


# --------------------------------------------------------------------------------------------------
# Bad arguments.


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"class_names": ["a", "b"]}, ValueError, "expected 3 names"),
        ({"class_names": ["a", "a", "b"]}, ValueError, "unique"),
        ({"class_names": []}, ValueError, "at least one"),
        ({"class_names": "abc"}, TypeError, "sequence of names"),
        ({"model_name": "../evil"}, ValueError, "model_name"),
        ({"model_name": ""}, ValueError, "model_name"),
        ({"top_k": 0}, ValueError, "top_k"),
        ({"version": 0}, ValueError, "version"),
        ({"task": "binary"}, ValueError, "one sigmoid output unit"),
        ({"task": "regression"}, ValueError, "task"),
        ({"warmup_images": []}, ValueError, "warmup_images"),
        ({"temperature": 0}, ValueError, "temperature: expected a number in"),
        ({"tta": "flop"}, ValueError, "tta: expected 'none' or"),
        ({"metadata": {"calibration": {"temperature": 2.0}}}, ValueError, "temperature exported"),
    ],
)
def test_bad_arguments_raise_clear_errors(tmp_path, kwargs, error, match):
    args = {"model_name": "m", "class_names": ["a", "b", "c"], **kwargs}
    with pytest.raises(error, match=match):
        savedmodel.export(tiny_model(), base_dir=tmp_path, verify=False, **args)
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())


def test_model_without_fixed_input_size_is_refused(tmp_path):
    inputs = keras.Input((None, None, 3))
    outputs = keras.layers.Dense(2, name="predictions")(
        keras.layers.GlobalAveragePooling2D()(inputs)
    )
    with pytest.raises(ValueError, match="H and W fixed"):
        savedmodel.export(
            keras.Model(inputs, outputs), "m", base_dir=tmp_path, class_names=["a", "b"]
        )


def test_load_exported_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        exported.load_exported(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="numeric version"):
        exported.load_exported(tmp_path / "empty")


# --------------------------------------------------------------------------------------------------
# tlkeras models.


def test_build_model_export_reads_the_spec(tmp_path):
    task = "binary"  # one sigmoid unit served as [1 - p, p]
    model = tlkeras.build_model(
        "MobileNet",
        2,
        weights=None,
        input_shape=(32, 32, 3),
        backbone_kwargs={"alpha": 0.25},
        head=tlkeras.HeadConfig(task=task),
    )
    result = savedmodel.export(
        model, "mobilenet", base_dir=tmp_path, class_names=["ants", "bees"], verify=False
    )
    loaded = exported.load_exported(result.path)
    meta = loaded.metadata
    assert (meta["backbone"], meta["strategy"], meta["task"]) == (
        "MobileNet",
        "feature_extraction",
        task,
    )
    assert meta["spec"]["backbone_kwargs"] == {"alpha": 0.25}
    assert meta["backbone_preprocessing"] == "tf"
    images = jpegs(2)
    expected = model.predict(pixels_of(images), verbose=0)
    if task == "binary":
        expected = np.concatenate([1 - expected, expected], -1)
    np.testing.assert_allclose(loaded.predict_bytes(images)["probabilities"], expected, atol=1e-5)


@needs_shared_weights
@needs_hymenoptera
@pytest.mark.slow
def test_real_weights_export_matches_on_real_photos(tmp_path):
    model = tlkeras.build_model(
        "MobileNet",
        2,
        weights=str(MOBILENET_WEIGHTS),
        input_shape=(224, 224, 3),
        backbone_kwargs={"alpha": 0.25},
    )
    # Real photos of both classes, including the shared GIF that is named .jpg.
    files = (
        sorted((HYMENOPTERA / "ants").glob("*.jpg"))[:2]
        + sorted((HYMENOPTERA / "bees").glob("*.jpg"))[:2]
    )
    gifs = [p for p in HYMENOPTERA.rglob("*.jpg") if p.read_bytes()[:3] == b"GIF"]
    images = [p.read_bytes() for p in files + gifs[:1]]
    result = savedmodel.export(
        model, "ants_bees", base_dir=tmp_path, class_names=["ants", "bees"], warmup_images=images
    )
    report = result.verification
    assert report["ok"] and report["num_images"] == len(images)
    assert report["serving_float_max_abs_diff"] <= 1e-5
    assert report["serving_default_max_abs_diff"] <= verify.BYTES_TOLERANCE
