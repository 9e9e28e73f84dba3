"""tlkeras.cli.run: a finished script leaves at once (exit_now), with its output and exit code."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

SCRIPT = """
import atexit, sys
sys.path.insert(0, {repo!r})
from tlkeras import cli

atexit.register(lambda: print("teardown ran", flush=True))

def main(argv):
    print("result written", end="")  # unflushed: exit_now must flush it
    return {code}

cli.run(main, exit_now={exit_now})
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The three runs below, started together: each mostly waits on its TensorFlow import."""
    cases = {"exit_3": (True, 3), "exit_none": (True, None), "teardown": (False, None)}
    procs = {}
    for name, (exit_now, code) in cases.items():
        script = tmp_path_factory.mktemp(name) / "script.py"
        script.write_text(SCRIPT.format(repo=str(REPO), code=code, exit_now=exit_now))
        procs[name] = subprocess.Popen(
            [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        out[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out


def test_exit_now_flushes_keeps_the_exit_code_and_skips_the_teardown(runs):
    out = runs["exit_3"]
    assert out.returncode == 3 and out.stdout == "result written"
    out = runs["exit_none"]
    assert out.returncode == 0 and "teardown ran" not in out.stdout


def test_without_exit_now_the_interpreter_tears_down_as_usual(runs):
    out = runs["teardown"]
    assert out.returncode == 0 and out.stdout == "result writtenteardown ran\n"


def _alias_flags():
    from absl import flags

    from tlkeras import cli

    fv = flags.FlagValues()
    flags.DEFINE_string("base_dir", "saved_models", "Base.", flag_values=fv)
    cli.define_deprecated_alias("export_dir", "base_dir", flag_values=fv)
    return cli, fv


def test_a_deprecated_alias_warns_in_one_line_and_forwards(capsys):
    cli, fv = _alias_flags()
    fv(["prog", "--export_dir=/tmp/models"])
    cli.apply_deprecated_aliases(fv)
    assert fv.base_dir == "/tmp/models" and fv["base_dir"].present
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "--export_dir is deprecated; use --base_dir" in err[0]

    cli, fv = _alias_flags()  # not given: no warning, the default stays
    fv(["prog"])
    cli.apply_deprecated_aliases(fv)
    assert fv.base_dir == "saved_models" and capsys.readouterr().err == ""


def test_a_deprecated_alias_and_its_flag_with_different_values_are_refused():
    import pytest

    cli, fv = _alias_flags()
    fv(["prog", "--export_dir=a", "--base_dir=b"])
    with pytest.raises(ValueError, match="--export_dir and --base_dir: expected one value"):
        cli.apply_deprecated_aliases(fv)
    cli, fv = _alias_flags()
    fv(["prog", "--export_dir=a", "--base_dir=a"])  # the same value twice is no conflict
    cli.apply_deprecated_aliases(fv)
    assert fv.base_dir == "a"


def test_every_script_that_loads_a_data_folder_has_max_bad_fraction():
    # Named by the loader's error ("Raise max_bad_fraction"): every such script must offer it.
    for script in ("train", "advise", "compare", "sweep", "evaluate", "export"):
        text = (REPO / "scripts" / f"{script}.py").read_text()
        assert "max_bad_fraction=FLAGS.max_bad_fraction" in text, script
        assert "define_max_bad_fraction()" in text or "define_model_flags(" in text, script


# --------------------------------------------------------------------------------------------------
# Flags generated from the config dataclasses (cli.define_config_flags / cli.config_values)


def _example_config():
    import dataclasses
    import enum

    class Mode(str, enum.Enum):
        FAST = "fast"
        SLOW = "slow"

    @dataclasses.dataclass(frozen=True)
    class Example:
        epochs: int = dataclasses.field(default=3, metadata={"help": "Epochs.", "lower_bound": 0})
        rate: float | None = dataclasses.field(default=None, metadata={"help": "Rate."})
        learning_rate: float = dataclasses.field(
            default=1e-3, metadata={"help": "LR.", "flag": "string"}
        )
        on: bool = dataclasses.field(default=True, metadata={"help": "On."})
        name: str = dataclasses.field(default="a", metadata={"help": "Name."})
        mode: Mode | str = dataclasses.field(
            default=Mode.FAST, metadata={"help": "Mode.", "choices": ("fast", "slow")}
        )
        poll: float = dataclasses.field(default=2.0, metadata={"help": "Poll.", "name": "poll_s"})
        hidden: int = 7  # no help: not an option
        items: tuple = dataclasses.field(default_factory=tuple)

    return Example


def test_config_flags_take_kind_default_choices_and_help_from_the_fields():
    from absl import flags

    from tlkeras import cli

    fv = flags.FlagValues()
    names = cli.define_config_flags(_example_config(), flag_values=fv)
    assert names == {
        "epochs": "epochs",
        "rate": "rate",
        "learning_rate": "learning_rate",
        "on": "on",
        "name": "name",
        "mode": "mode",
        "poll": "poll_s",
    }
    assert "hidden" not in fv and "items" not in fv  # a field without help is not a flag
    kinds = {n: fv[n].flag_type() for n in names.values()}
    assert kinds == {
        "epochs": "int",
        "rate": "float",
        "learning_rate": "string",
        "on": "bool",
        "name": "string",
        "mode": "string enum",
        "poll_s": "float",
    }
    assert fv["epochs"].default == 3 and fv["rate"].default is None
    assert fv["learning_rate"].default == "0.001" and fv["on"].default is True
    assert fv["mode"].default == "fast" and fv["mode"].parser.enum_values == ["fast", "slow"]
    assert fv["poll_s"].help == "Poll." and fv["epochs"].parser.lower_bound == 0
    fv(["prog"])
    values = cli.config_values(names, flag_values=fv)
    assert values == {
        "epochs": 3,
        "rate": None,
        "learning_rate": 0.001,  # parsed by cli.PARSERS["learning_rate"]
        "on": True,
        "name": "a",
        "mode": "fast",
        "poll": 2.0,
    }


def test_config_flags_parse_values_refuse_bad_ones_and_take_script_defaults_and_notes():
    import pytest
    from absl import flags

    from tlkeras import cli

    fv = flags.FlagValues()
    names = cli.define_config_flags(
        _example_config(),
        only=("epochs", "rate", "learning_rate", "mode"),
        exclude=("rate",),
        defaults={"epochs": None},
        notes={"epochs": "(default: 3; 5 with source: weights)", "learning_rate": ", or auto."},
        flag_values=fv,
    )
    assert list(names) == ["epochs", "learning_rate", "mode"]
    assert fv["epochs"].default is None
    assert fv["epochs"].help == "Epochs (default: 3; 5 with source: weights)."
    assert fv["learning_rate"].help == "LR, or auto."
    fv(["prog", "--epochs=4", "--learning_rate=auto", "--mode=slow"])
    assert cli.config_values(names, flag_values=fv) == {
        "epochs": 4,
        "learning_rate": "auto",
        "mode": "slow",
    }
    for bad in ("--mode=medium", "--epochs=-1", "--epochs=x"):
        with pytest.raises(flags.IllegalFlagValueError):
            fv(["prog", bad])
    fv(["prog", "--learning_rate=-1"])
    with pytest.raises(ValueError, match="--learning_rate: expected auto or a finite number > 0"):
        cli.config_values(names, flag_values=fv)


def test_the_library_configs_define_the_flags_the_scripts_had():
    import dataclasses

    from absl import flags

    from tlkeras import cli
    from tlkeras.data import DataConfig
    from tlkeras.fitting.config import TrainConfig
    from tlkeras.fitting.distribute import DistributeConfig

    fv = flags.FlagValues()
    train = cli.define_config_flags(TrainConfig, flag_values=fv)
    assert len(train) == len(dataclasses.fields(TrainConfig))  # 23
    dist = cli.define_config_flags(DistributeConfig, flag_values=fv)
    cli.define_config_flags(DataConfig, only=("validation_split",), flag_values=fv)
    assert (
        fv["class_weight"].flag_type() == "string"
        and fv["head_solver"].flag_type() == "string enum"
    )
    assert fv["distribution"].default == "default" and fv["augment_views"].parser.lower_bound == 0
    fv(["prog", "--class_weight=0:1.0,1:3.5", "--distribution=mirrored", "--cpu_replicas=2"])
    values = cli.config_values(train, flag_values=fv)
    assert values["class_weight"] == {0: 1.0, 1: 3.5} and values["learning_rate"] == 1e-3
    assert TrainConfig(**values) == TrainConfig(class_weight={0: 1.0, 1: 3.5})
    assert DistributeConfig(**cli.config_values(dist, flag_values=fv)).cpu_replicas == 2
