"""The run directory: never overwritten silently, never cleared when foreign, resumable."""

from __future__ import annotations

import json

import pytest

from tlkeras.fitting import rundir


def test_run_dir_is_never_silently_overwritten(tmp_path):
    run = tmp_path / "run"
    fp = {"config": 1}
    state = rundir.prepare_run_dir(run, fp)
    assert state["status"] == "running"
    assert rundir.prepare_run_dir(run, fp)["resumes"] == 1  # unfinished, same settings: resume
    with pytest.raises(ValueError, match="different settings"):
        rundir.prepare_run_dir(run, {"config": 2})
    rundir.write_state(run, {**state, "status": "done"})
    (run / "metrics.json").write_text("{}")
    with pytest.raises(FileExistsError, match="finished run.*overwrite"):
        rundir.prepare_run_dir(run, fp)
    assert (run / "metrics.json").exists()
    state = rundir.prepare_run_dir(run, fp, overwrite=True)
    assert state["status"] == "running" and not (run / "metrics.json").exists()


def test_check_run_dir_names_every_action_and_writes_nothing(tmp_path):
    # What every worker of a multi-worker run checks before the chief writes.
    run, fp = tmp_path / "run", {"config": 1}
    assert rundir.check_run_dir(run, fp) == ("new", None) and not run.exists()
    state = rundir.prepare_run_dir(run, fp)
    before = sorted(p.name for p in run.iterdir())
    assert rundir.check_run_dir(run, fp) == ("resume", state)
    assert rundir.check_run_dir(run, fp, overwrite=True)[0] == "overwrite"
    rundir.write_state(run, {**state, "status": "failed"})
    assert rundir.check_run_dir(run, fp)[0] == "restart"
    rundir.write_state(run, {**state, "status": "done"})
    with pytest.raises(FileExistsError, match="finished run"):
        rundir.check_run_dir(run, fp)
    assert sorted(p.name for p in run.iterdir()) == before
    assert json.loads((run / "run_state.json").read_text())["status"] == "done"


def test_foreign_directory_is_never_cleared(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="never cleared"):
            rundir.prepare_run_dir(tmp_path, {}, overwrite=overwrite)
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_merged_history_joins_phases_and_keeps_the_last_row_of_a_repeated_epoch(tmp_path):
    (tmp_path / rundir.phase_csv(1)).write_text("epoch,loss\n0,1.0\n1,0.8\n")
    # phase 2 resumed: epoch 3 was written twice (the last wins), and a kill cut a line short
    (tmp_path / rundir.phase_csv(2)).write_text("epoch,loss\n2,0.7\n3,0.9\n3,0.6\n4,0.")
    history, boundary = rundir.merged_history(tmp_path, 2)
    assert boundary == 2
    assert history["epoch"] == [0, 1, 2, 3, 4]
    assert history["phase"] == [1, 1, 2, 2, 2]
    assert history["loss"][:4] == [1.0, 0.8, 0.7, 0.6]


def test_to_jsonable_makes_strict_json(tmp_path):
    import numpy as np

    obj = {1: (np.float32(0.5), float("nan")), "p": tmp_path}
    assert rundir.to_jsonable(obj) == {"1": [0.5, None], "p": str(tmp_path)}
    path = rundir.write_json(obj, tmp_path / "x.json")
    assert json.loads(path.read_text()) == {"1": [0.5, None], "p": str(tmp_path)}


def test_kept_weights_names_the_phase_and_epoch_the_checkpoint_kept(tmp_path):
    names = ["head warm-up", "fine-tuning"]
    (tmp_path / rundir.phase_csv(1)).write_text("epoch,val_loss\n0,0.9\n")
    (tmp_path / rundir.phase_csv(2)).write_text("epoch,val_loss\n1,1.2\n2,0.8\n3,0.8\n")
    kept = rundir.kept_weights(tmp_path, names, "val_loss")
    # Ties keep the first epoch: the checkpoint saves on strict improvement only.
    assert (kept["phase"], kept["name"], kept["epoch"], kept["value"]) == (2, "fine-tuning", 3, 0.8)
    assert kept["best_by_phase"] == {"1": 0.9, "2": 0.8} and "note" not in kept

    (tmp_path / rundir.phase_csv(2)).write_text("epoch,val_loss\n1,1.2\n2,nan\n3,0.9\n")
    kept = rundir.kept_weights(tmp_path, names, "val_loss")
    assert (kept["phase"], kept["epoch"]) == (1, 1)  # a tie with phase 1 keeps phase 1
    assert kept["note"] == (
        "fine-tuning did not improve val_loss: phase 2 (fine-tuning) reached 0.9000 at best, "
        "phase 1 (head warm-up) 0.9000; the model keeps phase 1's weights"
    )
    assert rundir.kept_weights(tmp_path, names, "accuracy") is None  # not logged
