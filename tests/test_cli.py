"""tlkeras.cli.run: a finished script leaves at once (exit_now), with its output and exit code."""

from __future__ import annotations

from conftest import REPO, run_python

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


def _run(tmp_path, exit_now: bool, code: int):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.format(repo=str(REPO), code=code, exit_now=exit_now))
    return run_python(script, timeout=120)


def test_exit_now_flushes_keeps_the_exit_code_and_skips_the_teardown(tmp_path):
    out = _run(tmp_path, exit_now=True, code=3)
    assert out.returncode == 3 and out.stdout == "result written"
    out = _run(tmp_path, exit_now=True, code=None)
    assert out.returncode == 0 and "teardown ran" not in out.stdout


def test_without_exit_now_the_interpreter_tears_down_as_usual(tmp_path):
    out = _run(tmp_path, exit_now=False, code=None)
    assert out.returncode == 0 and out.stdout == "result writtenteardown ran\n"
