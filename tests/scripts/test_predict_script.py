"""scripts/export.py, predict.py and serve.py as a user runs them: exit codes, one-line errors."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import badfiles
import keras
import pytest
from conftest import REPO, run_python
from PIL import Image

from tlkeras.exports import layout, savedmodel
from tlkeras.exports import loading as exported_lib

SCRIPTS = REPO / "scripts"
NAMES = ["ants", "bees"]


def run(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return run_python(SCRIPTS / script, *args, env=env, timeout=timeout, cwd=REPO)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(Path(proc.args[1]).name), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i, colour in enumerate(badfiles.COLOURS[:2]):
        (folder / f"photo_{i}.jpg").write_bytes(
            badfiles.encode(badfiles.picture((48, 40), colour, seed=i), "JPEG")
        )
    (folder / "notes.txt").write_text("not an image, and not an image suffix: ignored in folders")
    return folder


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory) -> Path:
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Rescaling(1 / 255.0, name="rescale")(inputs)
    x = keras.layers.Conv2D(4, 3, name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(2, activation="softmax", name="predictions")(x)
    path = tmp_path_factory.mktemp("run") / "model.keras"
    keras.Model(inputs, outputs).save(path)
    (path.parent / "metrics.json").write_text(json.dumps({"class_names": NAMES}))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, keras_file, images) -> Path:
    """``scripts/export.py`` on a run directory (class names from its metrics.json)."""
    base = tmp_path_factory.mktemp("saved_models")
    proc = run(
        "export.py",
        f"--model={keras_file.parent}",
        "--model_name=ab",
        f"--base_dir={base}",
        f"--images={images}",
        "--noverify",
    )
    assert proc.returncode == 0, proc.stderr
    assert f"exported ab version 1 to {base / 'ab' / '1'}" in proc.stdout
    return base / "ab"


def test_export_script_writes_a_loadable_version(exported):
    model = exported_lib.load_exported(exported)
    assert model.version == 1 and model.class_names == NAMES
    assert (
        len(savedmodel.read_warmup_requests(model.path / "assets.extra" / layout.WARMUP_FILE)) == 2
    )
    # Written without --explain: predict.py --explain ends in this line before predicting.
    with pytest.raises(ValueError, match=r"without one; re-export with explain=True \(scripts/"):
        exported_lib.require_explain(model)


def test_predict_table_and_bad_file(exported, images, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"<html>404</html>")
    proc = run("predict.py", f"--model={exported}", str(images), str(bad))
    assert proc.returncode == 1, proc.stderr  # one file failed; the others are still answered
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    assert str(images / "photo_0.jpg") in out and str(images / "photo_1.jpg") in out
    assert "notes.txt" not in out
    assert f"{bad}\n  error: Unknown image file format" in out
    want = exported_lib.load_exported(exported).predict_bytes(
        [(images / "photo_0.jpg").read_bytes()]
    )
    top = want["classes"][0][0].decode()
    assert f"{images / 'photo_0.jpg'}\n  {top}  {want['scores'][0][0]:.4f}" in out


def test_predict_json(exported, images):
    proc = run(
        "predict.py",
        f"--model={exported / '1'}",
        "--json",
        "--top_k=1",
        str(images / "photo_1.jpg"),
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    (result,) = doc["results"]
    assert result["classes"][0] in NAMES and len(result["classes"]) == 1
    assert 0.0 <= result["scores"][0] <= 1.0


def test_usage_errors_are_one_line_with_exit_code_2(tmp_path, images):
    missing = tmp_path / "missing"
    calls = {
        "export.py": ([f"--model={missing}.keras", "--model_name=m"], "--model"),
        "predict.py": ([f"--model={missing}", str(images)], "model path"),
        "serve.py": ([f"--model_base_path={missing}"], "model_base_path: expected a directory"),
        "predict.py ": (["--model=x", "--top_k=0"], "--top_k"),
    }
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = {  # concurrently: each pays TensorFlow's import time
        key: subprocess.Popen(
            [sys.executable, str(SCRIPTS / key.strip()), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for key, (args, _) in calls.items()
    }
    for key, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        assert_one_line_error(done, calls[key][1])


def test_predict_explain_writes_one_overlay_per_image(keras_file, images, tmp_path):
    model, names = exported_lib.load_keras_model(keras_file)
    export = savedmodel.export(
        model, "abx", base_dir=tmp_path / "models", class_names=names, verify=False, explain=True
    )
    other = tmp_path / "other"
    other.mkdir()
    picture = badfiles.picture((30, 70), badfiles.COLOURS[3], seed=3)
    (other / "photo_0.png").write_bytes(badfiles.encode(picture, "PNG"))  # a stem seen twice
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = run_python(
        SCRIPTS / "predict.py",
        f"--model={export.path}",
        "--explain",
        "--json",
        str(images),
        str(other),
        env=env,
        cwd=work,
    )
    assert proc.returncode == 0, proc.stderr
    results = {r["path"]: r for r in json.loads(proc.stdout)["results"]}
    # Default --explain_dir: ./explain/ in the current directory; repeated stems get -2.
    want = {
        str(images / "photo_0.jpg"): ("photo_0.gradcam.png", (40, 48)),
        str(images / "photo_1.jpg"): ("photo_1.gradcam.png", (40, 48)),
        str(other / "photo_0.png"): ("photo_0-2.gradcam.png", (70, 30)),
    }
    assert set(results) == set(want)
    for path, (name, size) in want.items():
        gradcam = results[path]["gradcam"]
        assert gradcam["png"] == str(Path("explain") / name)
        assert gradcam["class"] == results[path]["classes"][0] and 0 <= gradcam["score"] <= 1
        with Image.open(work / "explain" / name) as png:  # over the photo at its own size
            assert png.format == "PNG" and png.size == size and png.mode == "RGB"
    assert sorted(p.name for p in (work / "explain").iterdir()) == sorted(
        n for n, _ in want.values()
    )


def test_serve_script_answers_real_requests(exported, images, tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "serve.py"), f"--model_base_path={exported}", "--port=0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()  # "serving ab versions [1] from … at http://127.0.0.1:PORT/…"
        assert line.startswith("serving ab versions [1] from"), (
            proc.stderr.read() if proc.poll() is not None else line
        )
        url = line.split(" at ")[1].split()[0]
        body = json.dumps(
            {
                "instances": [
                    {"b64": base64.b64encode((images / "photo_0.jpg").read_bytes()).decode()}
                ]
            }
        ).encode()
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(
                    urllib.request.Request(url + ":predict", data=body), timeout=60
                ) as r:
                    out = json.loads(r.read())
                break
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert out["predictions"][0]["classes"][0] in NAMES
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()


def test_bad_model_files_and_max_bad_fraction_end_export_and_evaluate_in_one_line(
    tmp_path, keras_file, exported
):
    not_zip = tmp_path / "broken.keras"
    not_zip.write_text("not a model\n")
    cut = tmp_path / "cut.keras"
    cut.write_bytes(keras_file.read_bytes()[: keras_file.stat().st_size // 2])
    folder = badfiles.make_dataset(tmp_path / "folder", NAMES, per_class=10)
    badfiles.write_cases(folder / "ants", [badfiles.BAD_CASES[0]])  # 1 of 21 files
    too_many = "expected at most 1% unusable files, received 1 of 21"
    calls = {
        "not_zip": ("export.py", [f"--model={not_zip}", "--model_name=m"], str(not_zip)),
        "cut": ("export.py", [f"--model={cut}", "--format=tflite"], "is not a .keras archive"),
        "eval_data": (
            "export.py",
            [f"--model={exported}", "--format=tflite", f"--eval_data={folder}"],
            too_many,
        ),
        "evaluate": ("evaluate.py", [f"--model={exported}", f"--data={folder}"], too_many),
    }
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = {  # concurrently: each pays TensorFlow's import time
        key: subprocess.Popen(
            [
                sys.executable,
                str(SCRIPTS / script),
                *args,
                "--max_bad_fraction=0.01",
                f"--output_dir={tmp_path / key}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for key, (script, args, _) in calls.items()
    }
    for key, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert proc.returncode == 2 and "Traceback" not in err, (key, err)
        assert len(lines) == 1 and calls[key][2] in lines[0], (key, err)
