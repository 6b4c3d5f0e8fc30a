"""How far a training got (RUN/trajectory/progress.json): written as it runs, said by
`diffin status` and by an interrupted `diffin train`, gone when it completes."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.rundir import RunDir
from pipeline.status import _train_line, describe, run_status
from pipeline.train import progress as train_progress
from pipeline.train.progress import ProgressWriter, read_progress
from pipeline.train.trajectory import train
from tests.train.conftest import train_argv


def test_the_record_is_written_at_start_at_each_save_and_at_most_every_interval(
    tmp_path, monkeypatch
):
    run = RunDir(str(tmp_path / "run"))
    (tmp_path / "run" / "trajectory").mkdir(parents=True)
    (tmp_path / "run" / "trajectory" / "progress.json").write_text('{"step": 99}')
    writer = ProgressWriter(run, steps=30, start=0, resumable_from=None)
    # at once: the record an earlier training left no longer describes this one
    assert read_progress(run)["step"] == 0 and read_progress(run)["resumable_from"] is None
    writer.step(5, 1.234567)
    assert read_progress(run)["step"] == 0  # within the interval: not written
    writer.saved(6)
    assert {k: read_progress(run)[k] for k in ("step", "steps", "resumable_from", "loss")} == {
        "step": 6,
        "steps": 30,
        "resumable_from": 6,
        "loss": 1.23457,
    }
    monkeypatch.setattr(train_progress, "EVERY_S", 0.0)
    writer.step(9, 1.0)
    assert read_progress(run)["step"] == 9 and read_progress(run)["resumable_from"] == 6
    from pipeline.runlock import LOST

    LOST.set()  # the run's lease taken over: the record is the new holder's
    try:
        writer.saved(20)
    finally:
        LOST.clear()
    assert read_progress(run)["step"] == 9
    (tmp_path / "run" / "trajectory" / "progress.json").write_text("{cut")
    assert read_progress(run) is None  # advisory: a record cut short is no record
    (tmp_path / "run" / "trajectory" / "progress.json").write_text('{"step": 3}')
    assert read_progress(run) is None
    (tmp_path / "run" / "trajectory" / "progress.json").write_text(
        '{"step": 3, "steps": 9, "loss": "x", "resumable_from": [1]}'
    )
    assert read_progress(run)["loss"] is None and read_progress(run)["resumable_from"] is None
    (tmp_path / "run" / "trajectory" / "progress.json").write_text('{"step": true, "steps": 9}')
    assert read_progress(run) is None


def test_a_killed_training_is_said_with_its_step_and_a_finished_one_has_no_record(
    interrupted, tmp_path
):
    run = str(tmp_path / "run")
    shutil.copytree(interrupted["run"], run)
    p = read_progress(RunDir(run))
    assert p is not None and p["steps"] == 30
    # resume_every=1: a state at every step; the kill may land between it and the record
    assert p["resumable_from"] in (p["step"], p["step"] - 1) and 0 < p["step"] < 30
    status = run_status(run)
    assert status["train"]["state"] == "unfinished"
    assert status["train"]["progress"]["step"] == p["step"]
    line = next(x for x in describe(status).splitlines() if x.startswith("train "))
    assert f"unfinished, stopped at step {p['step']} of 30; resumes from step " in line
    assert f"from step {p['resumable_from']}, which stopped" in status["next_why"]

    train(dataclasses.replace(interrupted["config"], run=run))
    assert not (Path(run) / "trajectory" / "progress.json").exists()
    assert run_status(run)["train"]["state"] == "trained"


def _interrupt_after_save(monkeypatch, at: int) -> None:
    real = ProgressWriter.saved

    def saved(self, step):
        real(self, step)
        if step >= at:
            raise KeyboardInterrupt

    monkeypatch.setattr(ProgressWriter, "saved", saved)


def test_an_interrupted_train_says_where_a_rerun_resumes(tiny_run, tmp_path, monkeypatch, capsys):
    cfg = dataclasses.replace(tiny_run["config"], resume_every=4)
    run = str(tmp_path / "run")
    argv = train_argv(tiny_run["data"], run, cfg)
    with monkeypatch.context() as m:
        _interrupt_after_save(m, 12)
        assert main(argv) == 130
    err = capsys.readouterr().err
    assert (
        "diffin train: interrupted; stopped at step 12 of 30; run the same command again to "
        "resume from step 12 (its last resume state" in err
    ), err
    line = next(x for x in describe(run_status(run)).splitlines() if x.startswith("train "))
    assert "unfinished, stopped at step 12 of 30; resumes from step 12 (resume state" in line

    # --no-resume: a rerun starts over, whatever state is there
    with monkeypatch.context() as m:
        _interrupt_after_save(m, 4)
        assert main([*argv, "--no-resume"]) == 130
    err = capsys.readouterr().err
    assert (
        "run the same command again to start it over, or without --no-resume to resume from "
        "step 4\n" in err
    ), err

    # stopped between resume states: the record says where it stopped, not where it was
    # last written (review: at most every 10 s)
    real = ProgressWriter.step

    def step(self, trained, loss):
        real(self, trained, loss)
        if trained == 14:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ProgressWriter, "step", step)
        assert main(argv) == 130
    err = capsys.readouterr().err
    assert "stopped at step 14 of 30; run the same command again to resume from step 12 " in err

    # preparing (the pool read, the sets written): where it resumes, not an earlier
    # training's step (review)
    with monkeypatch.context() as m:
        m.setattr(
            "pipeline.train.trajectory.save_sets",
            lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt),
        )
        assert main(argv) == 130
    assert read_progress(RunDir(run))["preparing"] is True
    err = capsys.readouterr().err
    assert (
        "interrupted; stopped while preparing (the pool read, the sets written), before its "
        "first step; run the same command again to resume from step 12 " in err
    ), err
    line = _train_line({**run_status(run)["train"], "state": "training"})
    assert line == (
        "training (preparing: reading the pool, writing the sets; resumes from step 12)"
    )

    # stopped while loading the pool: the record is the earlier training's, whose step
    # this process never trained (walkthrough: "stopped at step 12")
    with monkeypatch.context() as m:
        m.setattr(
            "pipeline.train.trajectory.load_pool",
            lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt),
        )
        assert main(argv) == 130
        err = capsys.readouterr().err
        assert (
            "interrupted; stopped before it trained, while loading the model and the pool; run "
            "the same command again (the run holds a resume state at step 12: the same config resumes "
            "from it)\n" in err
        ), err
        assert main([*argv, "--no-resume"]) == 130
        err = capsys.readouterr().err
        assert err.endswith(
            "stopped before it trained, while loading the model and the pool; run the same "
            "command again\n"
        ), err


def test_a_train_stopped_before_its_first_resume_state_says_it_starts_over(
    tiny_run, tmp_path, monkeypatch, capsys
):
    cfg = dataclasses.replace(tiny_run["config"], resume_every=0)
    run = str(tmp_path / "run")
    monkeypatch.setattr(train_progress, "EVERY_S", 0.0)
    first = tiny_run["record"]["checkpoints"][0]["step"]
    real = ProgressWriter.step

    def step(self, trained, loss):
        real(self, trained, loss)
        if trained == 3:
            raise KeyboardInterrupt

    # the first checkpoint (and so the first resume state) at step 0 would leave nothing
    # to show: the tiny run's first is later
    assert first > 3
    monkeypatch.setattr(ProgressWriter, "step", step)
    assert main(train_argv(tiny_run["data"], run, cfg)) == 130
    err = capsys.readouterr().err
    assert "stopped at step 3 of 30, before its first resume state; run the same command " in err
    status = run_status(run)
    assert status["train"]["state"] == "not trained"
    text = describe(status)
    assert "not trained (the last training stopped at step 3 of 30, before its first " in text

    # a first training stopped while writing its sets: nothing to resume
    fresh = str(tmp_path / "fresh")
    monkeypatch.setattr(
        "pipeline.train.trajectory.save_sets",
        lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt),
    )
    assert main(train_argv(tiny_run["data"], fresh, cfg)) == 130
    err = capsys.readouterr().err
    assert err.endswith(
        "interrupted; stopped before its first step; run the same command again to start it over\n"
    ), err


@pytest.mark.parametrize("age", [None, 3.0])
def test_the_line_of_a_training_under_way(age):
    t = {
        "state": "training",
        "resume_written_s_ago": age,
        "progress": {"step": 7, "steps": 30, "loss": 2.5, "resumable_from": 4, "written_s_ago": 1},
    }
    want = "training, step 7 of 30, loss 2.500 (1 s ago)"
    assert _train_line(t) == want + ("; resume state written 3 s ago" if age else "")
    assert _train_line({"state": "training", "resume_written_s_ago": None}) == "training"
