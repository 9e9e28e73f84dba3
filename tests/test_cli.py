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
