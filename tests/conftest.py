"""Shared test fixtures and locations."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import badfiles
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5"
HYMENOPTERA = SHARED / "data" / "hymenoptera" / "train"

needs_shared_weights = pytest.mark.skipif(
    not MOBILENET_WEIGHTS.is_file(), reason=f"shared weights not found at {MOBILENET_WEIGHTS}"
)
needs_hymenoptera = pytest.mark.skipif(
    not HYMENOPTERA.is_dir(), reason=f"shared ants/bees data not found at {HYMENOPTERA}"
)


def small_input(backbone: str) -> tuple[int, int, int]:
    """The smallest input each backbone accepts: architecture tests stay cheap."""
    import tlkeras

    size = max(32, tlkeras.get_backbone(backbone).min_size)
    return (size, size, 3)


@pytest.fixture
def keras_home(tmp_path: Path) -> Path:
    """A KERAS_HOME holding the shared MobileNet(alpha=0.25) ImageNet weights under models/.

    Keras reads KERAS_HOME when it is imported, so tests pass this to a subprocess's environment.
    """
    home = tmp_path / "keras_home"
    (home / "models").mkdir(parents=True)
    os.symlink(MOBILENET_WEIGHTS, home / "models" / MOBILENET_WEIGHTS.name)
    return home


def run_python(
    *args: str | Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
    cwd: str | Path | None = None,
    text: bool = True,
) -> subprocess.CompletedProcess:
    """Run this interpreter on ``args`` (a script and its flags, or ``"-c", code, …``) and wait.

    stdout and stderr are captured (as text unless ``text=False``); ``env`` defaults to this
    process's environment. The one way tests run a script or a snippet in a fresh process."""
    return subprocess.run(
        [sys.executable, *(str(a) for a in args)],
        env=None if env is None else dict(env),
        capture_output=True,
        text=text,
        timeout=timeout,
        cwd=cwd,
    )


def check_bad_flags_fail_in_one_line(
    script: Path,
    cases: Mapping[str, tuple[list[str], str]],
    env: Mapping[str, str],
    extra_args: Callable[[str], list[str]] = lambda name: [],
) -> None:
    """Each case ``name: (flags, text)`` ends ``script`` with exit 2 and one stderr line
    ``<script>: error: …`` containing ``text``, no traceback. All cases run at once: each process
    mostly waits on its TensorFlow import."""
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(script), *argv, *extra_args(name)],
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (argv, _) in cases.items()
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=180)
        lines = err.strip().splitlines()
        assert proc.returncode == 2, (name, err)
        assert "Traceback" not in err, (name, err)
        assert len(lines) == 1 and lines[0].startswith(f"{script.name}: error: "), (name, err)
        assert cases[name][1] in lines[0], (name, lines[0])


def bad_input_cases(
    tmp_path: Path, weights: str = "none", every_kind: bool = True
) -> dict[str, tuple[list[str], str]]:
    """The bad inputs every script with --weights and --data must end in one line: a weights file
    that is not what it claims (given, or in the Keras cache), a wrongly typed backbone argument,
    and --max_bad_fraction reaching the loader (1 of 21 files is bad: 5 % passes the default).
    ``weights``: of the last two (what the script accepts; the cache file is bad).
    ``every_kind=False``: of the given files only the truncated one — each case is a process with
    its own TensorFlow import, and every kind of bad file takes the same path through a script
    (``weights.resolve``), so train.py runs them all and the other scripts one."""
    files = badfiles.write_bad_weights(tmp_path / "weights")
    cases = {
        name: ([f"--weights={path}"], f"weights: {str(path)!r} {expect}")
        for name, path in files.items()
        for expect in [badfiles.BAD_WEIGHTS[name]]
        if every_kind or name == "truncated.h5"
    }
    cases["imagenet_cache"] = (["--weights=imagenet"], "the Keras cache file ")
    cases["backbone_kwargs"] = (
        [f"--weights={weights}", "--backbone_kwargs=alpha=zero"],
        "MobileNet expects alpha to be a number (default 1.0), received 'zero' (str)",
    )
    folder = badfiles.make_dataset(tmp_path / "folder", per_class=10)
    badfiles.write_cases(folder / "cats", [badfiles.BAD_CASES[0]])
    cases["max_bad_fraction"] = (
        [f"--weights={weights}", f"--data={folder}", "--max_bad_fraction=0.01"],
        "expected at most 1% unusable files, received 1 of 21",
    )
    return cases


def bad_input_env(tmp_path: Path, env: Mapping[str, str]) -> dict[str, str]:
    home = tmp_path / "bad_keras_home"
    badfiles.truncated_keras_cache(home)
    return {**env, "KERAS_HOME": str(home)}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One KERAS_HOME for a module whose tests pre-train the source task: it runs once, 1 epoch."""
    from tlkeras.fitting import pretrain

    path = tmp_path_factory.mktemp("keras_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KERAS_HOME", str(path))
        mp.setattr(pretrain, "DEFAULT_PRETRAIN_EPOCHS", 1)
        yield path


# One backbone per family (the table's 14 families) runs in the fast tier; the other 26 rows of the
# table run their per-backbone tests in the slow tier (`-m slow`), so every model is still checked.
FAST_BACKBONES = (
    "VGG16",
    "ResNet50",
    "ResNet50V2",
    "Xception",
    "InceptionV3",
    "InceptionResNetV2",
    "MobileNet",
    "MobileNetV2",
    "MobileNetV3Small",
    "DenseNet121",
    "NASNetMobile",
    "EfficientNetB0",
    "EfficientNetV2B0",
    "ConvNeXtTiny",
)


def every_backbone() -> list:
    """All 40 backbones as pytest params: the family representatives fast, the rest marked slow."""
    import tlkeras

    return [
        pytest.param(name, marks=() if name in FAST_BACKBONES else pytest.mark.slow)
        for name in tlkeras.backbone_names()
    ]
