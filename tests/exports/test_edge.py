"""Tests for tlkeras.exports.edge and tlkeras.exports.edge_runtime: TFLite (every quantization) and ONNX exports,
their verification and refusal, and scripts/export.py, predict.py and evaluate.py on them."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SHARED, check_bad_flags_fail_in_one_line, run_python

import tlkeras
from tlkeras.data.decoding import reference_decode
from tlkeras.exports import edge, edge_convert, edge_verify, savedmodel
from tlkeras.exports import loading as exported
from tlkeras.exports.signatures import resolve_head

SIZE = 32
CLASSES = ["ants", "bees"]
PHOTOS = SHARED / "data" / "hymenoptera" / "train"
EXPORT = REPO / "scripts" / "export.py"
PREDICT = REPO / "scripts" / "predict.py"
EVALUATE = REPO / "scripts" / "evaluate.py"


def _photos(n: int, skip: int = 0) -> tuple[list[bytes], np.ndarray]:
    """``n`` real ants/bees photos (alternating classes) and their labels."""
    files = [sorted((PHOTOS / c).iterdir()) for c in CLASSES]
    pairs = [(f, y) for row in zip(*files, strict=False) for y, f in enumerate(row)]
    chosen = pairs[skip : skip + n]
    return [f.read_bytes() for f, _ in chosen], np.array([y for _, y in chosen])


@pytest.fixture(scope="module")
def model():
    """A small MobileNet whose random head gives logits of unit spread on real photos: outputs
    that are neither uniform nor saturated, so agreement and differences mean something."""
    import keras

    keras.utils.set_random_seed(0)
    m = tlkeras.build_model(
        "MobileNet",
        2,
        weights=None,
        input_shape=(SIZE, SIZE, 3),
        backbone_kwargs={"alpha": 0.25},
    )
    layer = m.get_layer("predictions")
    kernel, bias = layer.get_weights()
    x = reference_decode(_photos(24)[0], (SIZE, SIZE))
    features = keras.Model(m.inputs, layer.input).predict(x, verbose=0)
    kernel = np.random.default_rng(0).normal(size=kernel.shape)
    logits = features @ kernel  # centred per class: both classes get predicted
    layer.set_weights([kernel / logits.std(), -logits.mean(0) / logits.std()])
    return m


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    base = tmp_path_factory.mktemp("saved_models")
    return savedmodel.export(model, "ants_bees", base_dir=base, class_names=CLASSES, verify=False)


@pytest.fixture(scope="module")
def images():
    data, labels = _photos(24)
    return reference_decode(data, (SIZE, SIZE)), labels


@pytest.fixture(scope="module")
def calibration():
    return reference_decode(_photos(40, skip=24)[0], (SIZE, SIZE))


def _run(path, pixels, tmp_path, delegates=None):
    """The file's probabilities from LiteRT/onnxruntime in a fresh process: this one has loaded
    TensorFlow's own TFLite runtime (the converter's calibrator), which LiteRT must not meet."""
    work = tmp_path / f"run-{Path(path).parent.name}"
    work.mkdir(exist_ok=True)
    delegates = edge.uses_delegates(path) if delegates is None else delegates
    out = edge_verify._run_fresh(Path(path), pixels, work, delegates)
    assert "error" not in out, out
    return out["probabilities"]


def _keras_probabilities(model, pixels):
    return resolve_head(model, None, None).probabilities(model(pixels, training=False)).numpy()


def test_float32_tflite_agrees_with_keras_and_writes_its_files(model, images, tmp_path):
    x, y = images
    out = tmp_path / "tflite"
    result = tlkeras.export_tflite(model, out, class_names=CLASSES, images=x, labels=y)
    assert result.path == out / "model.tflite"
    assert sorted(p.name for p in out.iterdir()) == ["labels.txt", "metadata.json", "model.tflite"]
    assert [p.name for p in tmp_path.iterdir()] == ["tflite"]  # no temporary left behind
    got = _run(result.path, x, tmp_path)
    want = _keras_probabilities(model, x)
    assert len(x) >= 20
    assert np.abs(got - want).max() <= 1e-4
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert len(set(want.argmax(-1))) == 2  # both classes predicted: the agreement is not trivial
    assert (out / "labels.txt").read_text().splitlines() == CLASSES
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["quantization"] == "none" and meta["format"] == "tflite"
    assert meta["input"]["shape"] == [1, SIZE, SIZE, 3]
    assert meta["input"]["input_dtype"] == "float32" and meta["class_names"] == CLASSES
    assert meta["backbone"] == "MobileNet" and meta["size_bytes"] == result.size_bytes
    v = meta["verification"]
    assert v["top1_agreement"] == 1.0 and v["num_images"] == len(x)
    assert v["accuracy"] == pytest.approx(np.mean(want.argmax(-1) == y))
    assert v["accuracy_change"] == pytest.approx(0.0) and v["latency_ms_per_image"] > 0
    assert "verified in LiteRT" in edge.summary(result)


@pytest.mark.parametrize("io_type", edge.IO_TYPES)
@pytest.mark.slow
def test_int8_uses_the_representative_data_and_the_requested_io_type(
    model, images, calibration, io_type, tmp_path
):
    x, y = images
    result = tlkeras.export_tflite(
        model,
        tmp_path / "int8",
        "int8",
        io_type=io_type,
        class_names=CLASSES,
        images=x,
        labels=y,
        calibration_images=calibration,
    )
    meta = json.loads((tmp_path / "int8" / "metadata.json").read_text())
    assert meta["input"]["input_dtype"] == io_type and meta["input"]["output_dtype"] == io_type
    assert meta["calibration_images"] == len(calibration)
    if io_type != "float32":
        q = meta["input"]["input_quantization"]
        assert q["scale"] > 0
        # Calibrated on photos: the input range is about 0..255, one step per pixel level.
        assert q["scale"] == pytest.approx(1.0, rel=0.05)
    # Reported, not refused: the agreement is measured against the float model.
    got = _run(result.path, x, tmp_path)
    want = _keras_probabilities(model, x)
    assert result.verification["max_abs_prob_diff"] == pytest.approx(np.abs(got - want).max())
    assert result.verification["top1_agreement"] == np.mean(got.argmax(-1) == want.argmax(-1))


def test_int8_without_calibration_data_is_refused(model, tmp_path):
    with pytest.raises(ValueError, match="calibration_images: full int8"):
        tlkeras.export_tflite(model, tmp_path / "x", "int8", class_names=CLASSES)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("quantization", ["float16", "dynamic"])
@pytest.mark.slow
def test_weight_quantizations_from_a_savedmodel_directory(saved, images, quantization, tmp_path):
    x, y = images
    f32 = tlkeras.export_tflite(saved.path, tmp_path / "f32", images=x)
    q = tlkeras.export_tflite(saved.path, tmp_path / quantization, quantization, images=x, labels=y)
    assert q.size_bytes < 0.7 * f32.size_bytes
    meta = json.loads((tmp_path / quantization / "metadata.json").read_text())
    assert meta["quantization"] == quantization and meta["input"]["input_dtype"] == "float32"
    assert meta["class_names"] == CLASSES and meta["version"] == saved.version
    assert f32.verification["images"] == "given"


def test_onnx_agrees_with_keras_on_a_batch(model, images, tmp_path):
    x, _ = images
    result = tlkeras.export_onnx(model, tmp_path / "onnx", class_names=CLASSES, images=x)
    got = _run(result.path, x, tmp_path)  # one call, the whole batch: the batch dimension is free
    assert got.shape == (len(x), 2)
    assert np.abs(got - _keras_probabilities(model, x)).max() <= 1e-4
    assert result.verification["runtime"] == "onnxruntime"
    import onnx

    graph = onnx.load(str(result.path)).graph
    assert [i.name for i in graph.input] == ["images"]
    assert [o.name for o in graph.output] == ["probabilities"]


@pytest.mark.slow
def test_onnx_of_a_backbone_with_captured_constants(tmp_path):
    """EfficientNet's normalisation constants: tf2onnx left them as extra graph inputs unless the
    function is frozen first."""
    m = tlkeras.build_model("EfficientNetB0", 2, weights=None, input_shape=(SIZE, SIZE, 3))
    result = tlkeras.export_onnx(m, tmp_path / "onnx", class_names=CLASSES)
    assert result.verification["max_abs_prob_diff"] <= 1e-4
    import onnx

    assert [i.name for i in onnx.load(str(result.path)).graph.input] == ["images"]


def test_a_float_conversion_that_disagrees_is_refused_and_nothing_written(
    model, images, tmp_path, monkeypatch
):
    real = edge_verify._run_fresh

    def off_by_a_bit(model_file, pixels, work, delegates):
        out = real(model_file, pixels, work, delegates)
        return {**out, "probabilities": out["probabilities"] + 1e-3}

    monkeypatch.setattr(edge_verify, "_run_fresh", off_by_a_bit)
    with pytest.raises(
        edge.EdgeExportError, match="disagrees with the SavedModel.*nothing written"
    ):
        tlkeras.export_tflite(model, tmp_path / "out", class_names=CLASSES, images=images[0])
    assert list(tmp_path.iterdir()) == []


def test_default_delegate_failure_falls_back_to_reference_kernels(
    model, images, tmp_path, monkeypatch
):
    calls = []
    real = edge_verify._run_fresh

    def xnnpack_aborts(model_file, pixels, work, delegates):
        calls.append(delegates)
        if delegates:
            return {"error": "killed by signal 6 (double free or corruption (!prev))"}
        return real(model_file, pixels, work, delegates)

    monkeypatch.setattr(edge_verify, "_run_fresh", xnnpack_aborts)
    result = tlkeras.export_tflite(model, tmp_path / "out", class_names=CLASSES, images=images[0])
    assert calls == [True, False]
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["runtime"]["delegates"] == "none"
    assert "signal 6" in meta["runtime"]["default_delegates_failed"]
    loaded = edge.load_edge_model(tmp_path / "out")  # runs as it was verified
    assert loaded.path == result.path
    assert np.allclose(
        loaded.predict(images[0][:2]), _keras_probabilities(model, images[0][:2]), atol=1e-4
    )


def test_a_runtime_that_dies_is_reported_in_one_line(tmp_path):
    bad = tmp_path / "model.tflite"
    bad.write_bytes(b"not a flatbuffer")
    result = edge_verify._run_fresh(
        bad, np.zeros((1, 8, 8, 3), "float32"), tmp_path, delegates=True
    )
    assert set(result) == {"error"} and "\n" not in result["error"]


def test_conversion_errors_name_the_backbone_format_and_ops():
    source = edge_convert.Source(None, None, CLASSES, (32, 32), {"backbone": "NASNetMobile"})
    error = RuntimeError(
        "<unknown>:0: error: loc(...): 'tf.Foo' op is neither a custom op nor a flex op\n"
        "<unknown>:0: note: see current operation\n'tf.Bar' op is neither..."
    )
    message = str(edge_convert._conversion_error(source, edge.EXPORT_FORMATS["tflite_int8"], error))
    assert message.startswith("NASNetMobile: cannot convert to tflite_int8: ")
    assert "tf.Bar, tf.Foo" in message and "\n" not in message
    plain = edge_convert._conversion_error(
        source, edge.EdgeConfig(), ValueError("line one\nline two")
    )
    assert str(plain) == "NASNetMobile: cannot convert to tflite: line one"


def test_a_model_with_ops_outside_the_builtins_gets_the_one_line_error(tmp_path):
    """A real converter refusal (an op with no TFLite builtin, Flex not used)."""
    import keras
    import tensorflow as tf

    class Svd(keras.layers.Layer):
        def call(self, x):
            return tf.linalg.svd(tf.reshape(x, [-1, 3, 3]), compute_uv=False)

    inputs = keras.Input((3, 3, 3))
    x = Svd()(inputs)
    x = keras.layers.Flatten()(x)
    m = keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="predictions")(x))
    with pytest.raises(edge.EdgeExportError, match=r"cannot convert to tflite: .*tf\.Svd"):
        tlkeras.export_tflite(m, tmp_path / "out", class_names=CLASSES)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_backbone_onnx_cannot_express_gets_the_one_line_error(tmp_path):
    """ConvNeXt: tf2onnx maps neither its exact GELU (Erfc) nor its depthwise convolution call;
    it would write an invalid file, tlkeras refuses with the ops named."""
    m = tlkeras.build_model("ConvNeXtTiny", 2, weights=None, input_shape=(SIZE, SIZE, 3))
    with pytest.raises(edge.EdgeExportError) as caught:
        tlkeras.export_onnx(m, tmp_path / "out", class_names=CLASSES)
    message = str(caught.value)
    assert message.startswith("ConvNeXtTiny: cannot convert to onnx: tf2onnx ")
    assert "Erfc" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"format": "coreml"}, "format: expected one of ('tflite', 'onnx'), received 'coreml'"),
        ({"quantization": "int4"}, "quantization: expected one of"),
        ({"format": "onnx", "quantization": "int8"}, "onnx format is written float32 only"),
        ({"io_type": "int16", "quantization": "int8"}, "io_type: expected one of"),
        ({"io_type": "uint8"}, "io_type: 'uint8' needs quantization='int8'"),
        ({"calibration_size": 0}, "calibration_size: expected a positive int, received 0"),
    ],
)
def test_config_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        edge.EdgeConfig(**kwargs)


def test_config_defaults_and_format_names():
    assert edge.EdgeConfig().io_type == "float32"
    assert edge.EdgeConfig(quantization="int8").io_type == "uint8"
    assert list(edge.EXPORT_FORMATS) == [
        "tflite",
        "tflite_float16",
        "tflite_dynamic",
        "tflite_int8",
        "onnx",
    ]
    assert edge.parse_export_formats(["saved_model", " tflite_int8", "tflite_int8"]) == (
        True,
        [edge.EXPORT_FORMATS["tflite_int8"]],
    )
    assert edge.parse_export_formats(["onnx"]) == (False, [edge.EXPORT_FORMATS["onnx"]])
    for bad in (["tflite_int4"], [], [""]):
        with pytest.raises(ValueError, match="export_formats: expected a comma-separated list"):
            edge.parse_export_formats(bad)


def test_existing_output_is_kept_without_overwrite(model, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tlkeras.export_tflite(model, tmp_path / "out", class_names=CLASSES)


@pytest.mark.slow
def test_predict_files_and_evaluate_accept_a_tflite(saved, images, tmp_path):
    """``load_exported`` on an edge file, in a fresh process (LiteRT in-process, as predict.py)."""
    result = tlkeras.export_tflite(saved.path, tmp_path / "edge", images=images[0])
    folder = tmp_path / "photos"
    for name in CLASSES:
        (folder / name).mkdir(parents=True)
        for f in sorted((PHOTOS / name).iterdir())[:3]:
            shutil.copy(f, folder / name / f.name)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    code = (
        "import json, sys; from tlkeras import exported, training\n"
        "m = exported.load_exported(sys.argv[1])\n"
        "rows = exported.predict_files(m, [sys.argv[2], sys.argv[3]])\n"
        "metrics = training.evaluate_export(sys.argv[1], sys.argv[2], verbose=0)\n"
        "print(json.dumps({'names': m.class_names, 'size': m.input_size, 'rows': rows,\n"
        "    'n': metrics['num_examples'], 'model': metrics['model']}))\n"
    )
    out = run_python(
        "-c", code, str(result.path), str(folder), str(tmp_path / "broken.jpg"), env=_env(tmp_path)
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["names"] == CLASSES and got["size"] == [SIZE, SIZE]
    assert got["n"] == 6 and got["model"] == str(result.path)
    rows = got["rows"]
    assert len(rows) == 7 and sum("error" in r for r in rows) == 1
    reference = exported.predict_files(
        exported.load_exported(saved.path), [folder, tmp_path / "broken.jpg"]
    )
    for row, want in zip(rows, reference, strict=True):
        assert ("error" in row) == ("error" in want)
        if "error" not in row:
            assert row["classes"] == want["classes"]
            assert np.allclose(row["scores"], want["scores"], atol=1e-4)


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "KERAS_HOME": str(tmp_path / "keras_home")}


@pytest.mark.slow
def test_scripts_export_int8_then_predict_and_evaluate_it(saved, tmp_path):
    data = tmp_path / "data"
    for name in CLASSES:
        (data / name).mkdir(parents=True)
        for f in sorted((PHOTOS / name).iterdir())[:6]:
            shutil.copy(f, data / name / f.name)
    out = run_python(
        EXPORT,
        f"--model={saved.path.parent}",
        "--format=tflite",
        "--quantization=int8",
        "--io_type=int8",
        f"--calibration_data={data}",
        f"--eval_data={data}",
        f"--base_dir={tmp_path / 'models'}",
        env=_env(tmp_path),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    edge_dir = tmp_path / "models" / "ants_bees" / "edge" / str(saved.version) / "tflite_int8"
    assert f"exported tflite_int8 to {edge_dir / 'model.tflite'}" in out.stdout
    assert "accuracy" in out.stdout and "on 12 given images" in out.stdout
    meta = json.loads((edge_dir / "metadata.json").read_text())
    assert meta["input"]["input_dtype"] == "int8" and meta["calibration_images"] == 12

    pred = run_python(
        PREDICT, f"--model={edge_dir / 'model.tflite'}", str(data), "--json", env=_env(tmp_path)
    )
    assert pred.returncode == 0, pred.stderr
    results = json.loads(pred.stdout)["results"]
    assert len(results) == 12 and all(r["classes"][0] in CLASSES for r in results)

    ev = run_python(
        EVALUATE,
        f"--model={edge_dir}",
        f"--data={data}",
        f"--output_dir={tmp_path / 'eval'}",
        env=_env(tmp_path),
    )
    assert ev.returncode == 0, ev.stderr
    scored = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert scored["num_examples"] == 12
    assert scored["accuracy"] == pytest.approx(meta["verification"]["accuracy"])


BAD_FLAGS = {
    "unknown_quantization": (["--format=tflite", "--quantization=int4"], "quantization"),
    "unknown_format": (["--format=coreml"], "format"),
    "io_type_without_int8": (["--format=tflite", "--io_type=uint8"], "io_type: 'uint8' needs"),
    "onnx_quantized": (["--format=onnx", "--quantization=dynamic"], "float32 only"),
    "int8_without_calibration": (
        ["--format=tflite", "--quantization=int8"],
        "calibration_images: full int8",
    ),
}


def test_export_bad_flags_exit_2_with_one_line(saved, tmp_path):
    check_bad_flags_fail_in_one_line(
        EXPORT,
        BAD_FLAGS,
        _env(tmp_path),
        lambda name: [f"--model={saved.path}", f"--base_dir={tmp_path / name}"],
    )


def test_evaluate_output_folder_is_named_after_the_export_folder(tmp_path):
    from tlkeras.workflows import evaluate

    edge_file = tmp_path / "m" / "edge" / "1" / "tflite_int8" / "model.tflite"
    edge_file.parent.mkdir(parents=True)
    edge_file.write_bytes(b"")
    assert evaluate.default_evaluate_dir(edge_file) == Path("runs/evaluate/1/tflite_int8")
    assert evaluate.default_evaluate_dir(edge_file.parent) == Path("runs/evaluate/1/tflite_int8")
    (tmp_path / "m" / "3").mkdir()
    assert evaluate.default_evaluate_dir(tmp_path / "m" / "3") == Path("runs/evaluate/m/3")


def test_edge_versions_sit_beside_the_savedmodel_versions(tmp_path):
    from tlkeras.exports import layout

    assert layout.next_edge_version(tmp_path, "m") == 1
    (tmp_path / "m" / "2").mkdir(parents=True)
    (tmp_path / "m" / "2" / "saved_model.pb").write_bytes(b"")
    assert layout.next_edge_version(tmp_path, "m") == 3  # never a SavedModel version's number
    (tmp_path / "m" / "edge" / "5").mkdir(parents=True)
    assert layout.next_edge_version(tmp_path, "m") == 6
    assert layout.edge_dir(tmp_path, "m", 2, "tflite_int8") == tmp_path / "m/edge/2/tflite_int8"
    assert layout.resolve_version_dir(tmp_path / "m") == tmp_path / "m" / "2"  # edge/ is ignored


@pytest.mark.slow
def test_train_writes_edge_formats_without_a_savedmodel(tmp_path):
    """``export_formats`` without ``saved_model``: converted from the in-memory model, numbered
    as the next version, verified on the run's test split."""
    result = tlkeras.train(
        "digits:0-2",
        backbone="MobileNet",
        backbone_kwargs={"alpha": 0.25},
        weights=None,
        image_size=32,
        strategy="partial",
        fine_tune_at=-1,
        epochs=1,
        fine_tune_epochs=1,
        output_dir=tmp_path / "run",
        export_dir=tmp_path / "models",
        model_name="tiny",
        export_formats=["tflite"],
        report=False,
        verbose=0,
    )
    assert result.export is None
    out = tmp_path / "models" / "tiny" / "edge" / "1" / "tflite"
    assert [r.path for r in result.edge_exports] == [out / "model.tflite"]
    written = result.metrics["edge_exports"]["tflite"]
    assert written["top1_agreement"] == 1.0 and written["num_images"] > 0
    # Scored on the test split: the same accuracy the run reports for the Keras model.
    assert written["reference_accuracy"] == pytest.approx(result.metrics["accuracy"])
    assert not (tmp_path / "models" / "tiny" / "1").exists()
