"""One writer per stage in a run directory: flock locks on local paths, leases on stores."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from pipeline import runlock
from pipeline.cli import main
from pipeline.errors import ConfigError
from pipeline.rundir import RunDir
from pipeline.runlock import RunBusy, hold, holders
from pipeline.status import describe, run_status
from pipeline.train.progress import ProgressWriter
from tests.conftest import copy_run

REPO = Path(__file__).resolve().parents[1]

HOLDER = """
import sys, time
from pipeline import runlock
with runlock.hold(sys.argv[1], sys.argv[2].split(","), sys.argv[3]):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder():
    """Start another process holding locks of a run; yields a function that starts one."""
    started: list[subprocess.Popen] = []

    def start(run: str, names: str, command: str = "train") -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, run, names, command],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        started.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def test_a_conflicting_stage_is_refused_and_names_the_holder(holder, tmp_path):
    run = str(tmp_path / "run")
    proc = holder(run, "train")
    with pytest.raises(RunBusy, match=rf"in use by diffin train \(pid {proc.pid} on ") as exc:
        with hold(run, ["score"], "score"):
            pytest.fail("a score ran during a train")
    assert "wait for it to finish (diffin status --run" in str(exc.value)
    with pytest.raises(RunBusy, match="in use by diffin train"):
        with hold(run, ["train"], "train"):
            pytest.fail("two trains ran at once")
    # evaluate and report write their own folders: they may run beside a train
    with hold(run, ["evaluate"], "evaluate"), hold(run, ["report"], "report"):
        assert set(holders(run)) == {"train", "evaluate", "report"}
    info = holders(run)["train"]
    assert (info["pid"], info["stage"], info["command"]) == (proc.pid, "train", "train")
    # a refused stage let go of its own lock: only the train's is held
    assert set(holders(run)) == {"train"}


def test_a_stage_that_takes_its_own_lock_then_finds_a_conflict_lets_go(holder, tmp_path):
    """Ours first, then the others': a train finding a score refuses and holds nothing."""
    run = str(tmp_path / "run")
    holder(run, "score", "score")
    with pytest.raises(RunBusy, match="in use by diffin score"):
        with hold(run, ["train"], "train"):
            pass
    assert set(holders(run)) == {"score"}


def test_a_killed_holder_leaves_no_lock(holder, tmp_path):
    """flock goes with its process, even on kill -9: never a stale lock to clear by hand."""
    run = str(tmp_path / "run")
    proc = holder(run, "train,score", "demo")
    assert set(holders(run)) == {"train", "score"}
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert holders(run) == {}
    with hold(run, ["train"], "train"):
        assert holders(run)["train"]["pid"] == os.getpid()
    # the lock files stay (removing one would race with a process opening it), empty
    assert (tmp_path / "run" / "locks" / "train.lock").read_text() == "" and holders(run) == {}


def test_a_run_made_only_to_hold_the_lock_is_removed_and_an_existing_one_kept(tmp_path):
    run = tmp_path / "run"
    with hold(str(run), ["train"], "train"):
        assert (run / "locks" / "train.lock").is_file()
        data = json.loads((run / "locks" / "train.lock").read_text())
        assert data["pid"] == os.getpid() and data["command"] == "train"
    assert not run.exists()  # a refused or failed first train leaves no empty run behind
    deep = tmp_path / "new" / "runs" / "r1"
    with hold(str(deep), ["train"], "train"):
        pass
    assert not (tmp_path / "new").exists()  # the parents it made too
    with hold(str(run), ["train"], "train"):
        (run / "run.json").write_text("{}")  # a first train that wrote: the run stays
    assert sorted(p.name for p in run.iterdir()) == ["run.json"]
    with hold(str(run), ["train"], "train"):  # a run that was there: its lock file stays
        pass
    assert sorted(p.name for p in run.iterdir()) == ["locks", "run.json"]
    assert (run / "locks" / "train.lock").read_text() == ""  # no identity of a gone holder


def test_a_process_asking_about_a_free_lock_does_not_get_a_stage_refused(tmp_path):
    """Review: `diffin status` (or a starting stage) takes a free lock for an instant to
    ask whether it is held; a stage starting at that instant was refused."""
    run = str(tmp_path / "run")
    os.makedirs(f"{run}/locks")
    asking = subprocess.Popen(
        [sys.executable, "-c", POLLER, run],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert asking.stdout.readline().strip() == "polling"
        for _ in range(400):
            with hold(run, ["train"], "train"):
                pass
    finally:
        asking.kill()
        asking.wait()


POLLER = """
import sys, time
from pipeline import runlock
runlock.holders(sys.argv[1])
print("polling", flush=True)
end = time.time() + 60
while time.time() < end:
    runlock.holders(sys.argv[1])
"""


def test_run_json_updates_that_meet_lose_nothing(tmp_path):
    """Prune takes no stage lock and evaluate may finish beside a score: both update
    run.json, a read-modify-write (review)."""
    import threading

    from pipeline.rundir import RunDir, read_json

    run = RunDir(str(tmp_path / "run"))
    os.makedirs(run.url)

    def update(i: int) -> None:
        for j in range(25):
            run.update_run_json(f"prune/t{i}-{j}", {"kept": j})

    threads = [threading.Thread(target=update, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(read_json(run.run_json)) == 100


def test_one_process_may_hold_several_and_nest(tmp_path):
    """The demo holds every stage's lock, and its stages run in the same process."""
    run = str(tmp_path / "run")
    with hold(run, ["train", "score", "evaluate", "report"], "demo"):
        with hold(run, ["score"], "score"):  # its own: not a conflict
            assert set(holders(run)) == {"train", "score", "evaluate", "report"}
        assert "score" in holders(run)  # the inner block did not let go of the demo's
    assert holders(run) == {}


# -- leases, on a store without locks (memory://; S3 in tests/integration/test_s3.py) ----


def _lease(url: str, **fields) -> None:
    info = {"stage": "train", "command": "train", "owner": "someone", "host": "elsewhere",
            "pid": 7, "started": time.time() - 60, "heartbeat": time.time(), **fields}  # fmt: skip
    with fsspec.open(url, "wb") as f:
        f.write(json.dumps(info).encode())


def test_status_says_a_lease_that_missed_its_renewals(tmp_path):
    run = f"memory://{tmp_path.name}/run"
    _lease(f"{run}/locks/train.json", heartbeat=time.time() - 5)
    line = next(x for x in describe(run_status(run)).splitlines() if x.startswith("running"))
    assert line.startswith("running   diffin train (pid 7 on elsewhere") and "[" not in line
    _lease(f"{run}/locks/train.json", heartbeat=time.time() - 75)
    line = next(x for x in describe(run_status(run)).splitlines() if x.startswith("running"))
    assert line.endswith(
        "[lease not renewed for 75 s: its process has stopped or stalled; a stage started "
        "now takes the lease over once it is 120 s old]"
    ), line


def test_a_live_lease_refuses_and_a_stale_one_is_taken_over(tmp_path, caplog):
    run = f"memory://{tmp_path.name}/run"
    _lease(f"{run}/locks/train.json")
    with pytest.raises(RunBusy, match=r"in use by diffin train \(pid 7 on elsewhere") as exc:
        with hold(run, ["score"], "score"):
            pass
    assert "lease was renewed 0 s ago, and one not renewed for 120 s is taken over" in str(
        exc.value
    )
    assert not fsspec.filesystem("memory").exists(f"/{tmp_path.name}/run/locks/score.json")

    _lease(f"{run}/locks/train.json", heartbeat=time.time() - 500)  # its process is gone
    assert holders(run) == {}
    with caplog.at_level(logging.WARNING, logger="pipeline.runlock"):
        with hold(run, ["train"], "train"):
            assert holders(run)["train"]["pid"] == os.getpid()
    assert "taking over the lease " in caplog.text
    assert "train.json of diffin train (pid 7 on elsewhere" in caplog.text
    assert holders(run) == {}  # released: the lease is gone


def test_a_lease_is_renewed_while_held_and_a_holder_that_lost_it_stops(tmp_path, caplog):
    run = f"memory://{tmp_path.name}/run"
    url = f"{run}/locks/score.json"
    fs = fsspec.filesystem("memory")
    with pytest.raises(KeyboardInterrupt):  # as Ctrl-C: the stage stops and resumes later
        with hold(run, ["score"], "score", ttl=2.0):  # renewed every 0.5 s
            first = json.loads(fs.cat_file(url))["heartbeat"]
            time.sleep(1.2)
            assert json.loads(fs.cat_file(url))["heartbeat"] > first  # renewed every ttl/4
            assert set(holders(run, ttl=2.0)) == {"score"}
            with caplog.at_level(logging.ERROR, logger="pipeline.runlock"):
                _lease(url, stage="score", command="score")  # another took it over
                _wait(5)
            pytest.fail("a holder that lost its lease went on writing")
    assert "lost its lease on the run (it was taken over by diffin score (pid 7 on" in caplog.text
    assert runlock.LOST.is_set()  # the stage writes no record of its stop over the new one's
    with hold(run, ["report"], "report"):  # a next stage of this process starts afresh
        assert not runlock.LOST.is_set()
    assert json.loads(fs.cat_file(url))["owner"] == "someone"  # not ours: left in place


def test_a_lease_that_cannot_be_renewed_for_its_ttl_stops_the_holder(tmp_path, monkeypatch):
    from fsspec.implementations.memory import MemoryFileSystem

    run = f"memory://{tmp_path.name}/run"
    with pytest.raises(KeyboardInterrupt):
        with hold(run, ["train"], "train", ttl=2.0):  # gives up after 1 s

            def down(self, path, value, **kwargs):
                raise OSError("the store is unreachable")

            monkeypatch.setattr(MemoryFileSystem, "pipe_file", down)
            _wait(5)
            pytest.fail("a holder whose lease lapsed went on writing")


def _wait(seconds: float) -> None:
    """Short sleeps: a stop delivered to the main thread lands between two."""
    end = time.time() + seconds
    while time.time() < end:
        time.sleep(0.05)


IGNORING = """
import json, signal, sys, time
import fsspec
from pipeline import runlock
signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job of a script
run = sys.argv[1]
with runlock.hold(run, ["train"], "train", ttl=0.4):
    lease = {"owner": "x", "pid": 7, "host": "h", "heartbeat": time.time() + 60}
    with fsspec.open(run + "/locks/train.json", "wb") as f:
        f.write(json.dumps(lease).encode())
    time.sleep(30)
print("went on")
"""


def test_a_holder_with_sigint_ignored_that_loses_its_lease_still_stops(tmp_path):
    """Review: Ctrl-C's stand-in does nothing where SIGINT is ignored; SIGTERM does."""
    proc = subprocess.run(  # memory:// is per process: the other holder is faked inside
        [sys.executable, "-c", IGNORING, f"memory://{tmp_path.name}/run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert "went on" not in proc.stdout and "lost its lease" in proc.stderr


def test_a_lease_that_missed_its_renewals_is_waited_out_not_refused(tmp_path, caplog):
    """Review: a retried job (KubeRay) found its killed driver's lease and failed at once."""
    run = f"memory://{tmp_path.name}/run"
    _lease(f"{run}/locks/score.json", stage="score", heartbeat=time.time() - 2.5)
    with caplog.at_level(logging.WARNING, logger="pipeline.runlock"):
        with hold(run, ["score"], "score", ttl=4.0):  # waited out from 2 s on
            assert holders(run, ttl=4.0)["score"]["pid"] == os.getpid()
    assert "waiting up to " in caplog.text and "taking over the lease" in caplog.text
    _lease(f"{run}/locks/score.json", stage="score", heartbeat=time.time() - 0.1)  # renewed
    with pytest.raises(RunBusy):
        with hold(run, ["score"], "score", ttl=4.0):
            pass


def test_threads_of_one_process_do_not_share_a_lock(tmp_path):
    """Review: a second thread "held" the train lock its process held already."""
    import threading

    run = str(tmp_path / "run")
    refused = []

    def second() -> None:
        try:
            with hold(run, ["train"], "train"):
                pass
        except RunBusy as exc:
            refused.append(exc)

    with hold(run, ["train"], "train"):
        t = threading.Thread(target=second)
        t.start()
        t.join()
    assert len(refused) == 1


def test_a_locks_folder_the_user_may_not_write_is_said_not_spun_on(tmp_path, monkeypatch):
    """Review: another user's RUN/locks (0755) made a stage spin at 100% CPU forever."""
    real = os.open
    run = tmp_path / "run"
    (run / "locks").mkdir(parents=True)

    def as_another_user(path, flags, *args):
        if str(path).startswith(str(run / "locks")) and flags & (os.O_RDWR | os.O_WRONLY):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, flags, *args)

    monkeypatch.setattr(os, "open", as_another_user)
    t0 = time.time()
    with pytest.raises(runlock.StageFailed, match="cannot lock .*train.lock .*group-writable"):
        with hold(str(run), ["train"], "train"):
            pass
    assert time.time() - t0 < 10


def test_a_lease_that_does_not_read_as_one_is_aged_by_the_store(tmp_path, monkeypatch):
    """Review: an empty or malformed lease counted as live forever (and "[]" crashed)."""
    import datetime as dt

    from fsspec.implementations.memory import MemoryFileSystem

    run = f"memory://{tmp_path.name}/run"
    for junk in (b"", b"[]", b'{"heartbeat": "soon"}'):
        with fsspec.open(f"{run}/locks/train.json", "wb") as f:
            f.write(junk)
        with pytest.raises(RunBusy, match="train.json does not read as one"):
            with hold(run, ["score"], "score"):
                pass
    old = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=600)
    monkeypatch.setattr(MemoryFileSystem, "modified", lambda self, path: old)
    assert holders(run) == {}
    with hold(run, ["train"], "train"):
        assert holders(run)["train"]["pid"] == os.getpid()


def test_a_lease_of_a_dead_process_on_this_machine_is_taken_over_at_once(tmp_path):
    """Walkthrough: a stage killed outright kept its S3 run for two minutes, named as
    running by status. Here (same boot, same pid namespace) its pid tells."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = f"memory://{tmp_path.name}/run"
    here = runlock._machine()
    assert here is not None
    _lease(f"{run}/locks/train.json", pid=dead.pid, machine=here)
    assert holders(run) == {}
    _lease(f"{run}/locks/train.json", pid=os.getpid(), machine=here)  # alive
    assert set(holders(run)) == {"train"}
    _lease(f"{run}/locks/train.json", pid=dead.pid, machine="another-boot:1")  # elsewhere
    assert set(holders(run)) == {"train"}
    _lease(f"{run}/locks/train.json", pid=dead.pid, machine=here)
    with hold(run, ["train"], "train"):
        assert holders(run)["train"]["pid"] == os.getpid()


def test_a_file_given_as_the_run_is_a_configuration_error(tmp_path, capsys):
    """Walkthrough: NotADirectoryError from the lock, a traceback."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="cannot be a run folder"):
        with hold(str(tmp_path / "afile"), ["report"], "report"):
            pass
    assert main(["report", "--run", str(tmp_path / "afile")]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_store_without_exclusive_create_still_gets_a_lease(tmp_path, monkeypatch):
    """Review: a store answering the conditional write with an error of its own (a 409
    race, a 501, an older s3fs) gave a traceback."""
    from fsspec.implementations.memory import MemoryFileSystem

    real = MemoryFileSystem.pipe_file

    def plain(self, path, value, mode="overwrite", **kwargs):
        if mode == "create":
            raise OSError("NotImplemented: If-None-Match")
        return real(self, path, value, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "pipe_file", plain)
    run = f"memory://{tmp_path.name}/run"
    with hold(run, ["score"], "score"):
        assert holders(run)["score"]["pid"] == os.getpid()
    _lease(f"{run}/locks/score.json", stage="score", command="score")
    with pytest.raises(RunBusy, match="in use by diffin score"):
        with hold(run, ["score"], "score"):
            pass


# -- through the command ------------------------------------------------------------------


def test_score_is_refused_during_a_train_and_status_says_what_runs(
    holder, tiny_scored, tmp_path, capsys
):
    run = copy_run(tiny_scored["run"], tmp_path / "run")
    before = sorted(p.name for p in (tmp_path / "run" / "scores").iterdir())
    proc = holder(run, "train")
    argv = ["score", "--data", tiny_scored["data"], "--run", run, "--methods", "loss"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"diffin score: {run} is in use by diffin train (pid {proc.pid} on ")
    assert len(err.splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "run" / "scores").iterdir()) == before

    status = run_status(run)
    assert status["running"]["train"]["pid"] == proc.pid
    assert status["next"] == f"diffin status --run {run}"
    assert status["next_why"].endswith("is under way now; look again when it has finished")
    assert f"running   diffin train (pid {proc.pid} on " in describe(status)
    # the same, read by `diffin status --json`
    assert main(["status", "--run", run, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["running"]["train"]["pid"] == proc.pid

    proc.kill()
    proc.wait()
    status = run_status(run)
    assert status["running"] == {} and not status["next"].startswith("diffin status")


def test_a_killed_score_is_said_to_be_killed(tiny_scored, tmp_path):
    """progress.json says "scoring", and no process holds the run: it was killed."""

    from pipeline.rundir import write_json

    run = copy_run(tiny_scored["run"], tmp_path / "run")
    (tmp_path / "run" / "scores.parquet").unlink()
    write_json(f"{run}/scores/progress.json", {"state": "scoring"})
    status = run_status(run)
    assert status["score"]["state"] == "killed" and status["running"] == {}
    assert status["score"]["progress"]["state"] == "scoring"  # what progress.json says
    assert status["next"].startswith("diffin score ")
    assert status["next_why"].startswith("the last score run was killed while scoring (no ")
    assert "score     killed (last run scoring" in describe(status)


def test_while_a_score_runs_the_other_stages_say_so(holder, tiny_scored, tmp_path, capsys, caplog):
    """Walkthrough: prune, report and status called a table being scored interrupted, and
    said to run the score again, which would be refused."""
    import pyarrow.parquet as pq

    from pipeline.rundir import write_json
    from pipeline.score.table import table_metadata, write_table

    run = copy_run(tiny_scored["run"], tmp_path / "run")
    holder(run, "score", "score")
    status = run_status(run)
    assert status["score"]["state"] == "scored"  # this table is current until it finishes
    table = f"{run}/scores.parquet"  # a table of a recorded fingerprint, as the driver's
    meta = {**table_metadata(table), "fingerprint": {"methods": ["loss"]}}
    write_table(pq.read_table(table), table, meta)
    write_json(f"{run}/scores/fingerprint.json", {"hash": "another"})  # a rescore's
    with caplog.at_level(logging.WARNING):
        assert main(["prune", "--run", run, "--keep", "0.5"]) == 0
    said = caplog.text
    assert "diffin score (pid " in said and "under way now with other inputs, will replace" in said
    assert "interrupted" not in said
    # a manifest of this table is not "of an earlier table" while the rescore runs
    # (walkthrough: every manifest was marked once the table warned)
    status = run_status(run)
    assert status["prune"] and not any(m["stale"] for m in status["prune"])
    assert "[ranks an earlier table]" not in describe(status)
    assert "(a rescore under way, " not in describe(status)  # progress.json: finished

    # a rescore after a retraining (walkthrough: told to run the score that was running)
    write_json(f"{run}/scores/progress.json", {"state": "preparing"})
    traj = json.loads((tmp_path / "run" / "trajectory" / "trajectory.json").read_text())
    write_table(pq.read_table(table), table, {**meta, "checkpoints": traj["checkpoints"]})
    traj["checkpoints"] = [{**c, "sha256": "another"} for c in traj["checkpoints"]]
    (tmp_path / "run" / "trajectory" / "trajectory.json").write_text(json.dumps(traj))
    assert main(["prune", "--run", run, "--keep", "0.5", "--name", "again"]) == 1  # busy
    err = capsys.readouterr().err
    assert "was scored against another trajectory than the run's; diffin score (pid " in err
    assert "is scoring it again now: run this again when it has finished" in err
    assert "run `diffin score` again" not in err
    status = run_status(run)
    assert status["next"] == f"diffin status --run {run}"
    assert all(m["stale"] for m in status["prune"])  # ranking the other trajectory's table
    # preparing (directions, propagation): progress.json is not rewritten, its age not said
    (tmp_path / "run" / "scores.parquet").rename(tmp_path / "table.parquet")
    line = next(x for x in describe(run_status(run)).splitlines() if x.startswith("score "))
    assert line == "score     preparing (directions and propagation, before the shards)", line
    (tmp_path / "table.parquet").rename(tmp_path / "run" / "scores.parquet")

    (tmp_path / "run" / "scores.parquet").unlink()  # a first score: no table yet
    assert main(["report", "--run", run]) == 1  # busy, not a mistyped command
    err = capsys.readouterr().err
    assert "no score table at " in err and "is scoring now (" in err
    assert "run the same" not in err


def test_a_rescore_still_preparing_is_said_by_prune(holder, tiny_scored, tmp_path, caplog):
    """Walkthrough: prune was silent while a rescore computed its directions, as the
    rescore's fingerprint.json is written only after them (it still matched the table)."""
    from pipeline.rundir import write_json

    run = copy_run(tiny_scored["run"], tmp_path / "run")
    with caplog.at_level(logging.WARNING):
        assert main(["prune", "--run", run, "--keep", "0.5"]) == 0
    assert "under way now" not in caplog.text  # no rescore: nothing to say
    proc = holder(run, "score", "score")
    write_json(f"{run}/scores/progress.json", {"state": "preparing"})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["prune", "--run", run, "--keep", "0.5", "--name", "during"]) == 0
    said = caplog.text
    assert f"diffin score (pid {proc.pid} on " in said
    assert "is under way now, preparing its inputs: if they differ from this table's it " in said
    status = run_status(run)
    assert status["score"]["state"] == "preparing"
    assert not any(m["stale"] for m in status["prune"])  # what they ranked is still the table
    proc.kill()
    proc.wait()  # killed while preparing: no process holds the run, nothing to warn of
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["prune", "--run", run, "--keep", "0.5", "--name", "after"]) == 0
    assert "under way now" not in caplog.text


def test_a_table_of_a_trajectory_being_trained_again_says_what_to_do(
    holder, tiny_scored, tmp_path, capsys
):
    """Walkthrough: "the run is being trained again" when that training had stopped, and
    "run `diffin train` first" to a score of a run whose retraining had stopped."""
    import pyarrow.parquet as pq

    from pipeline.score.table import table_metadata, write_table

    run = copy_run(tiny_scored["run"], tmp_path / "run")
    traj = tmp_path / "run" / "trajectory"
    table = f"{run}/scores.parquet"  # as the driver writes it: the checkpoints it scored
    checkpoints = json.loads((traj / "trajectory.json").read_text())["checkpoints"]
    write_table(pq.read_table(table), table, {**table_metadata(table), "checkpoints": checkpoints})
    (traj / "trajectory.json").unlink()  # as a training does when it starts
    (traj / "resume.pt").write_bytes(b"")
    proc = holder(run, "train")
    assert main(["prune", "--run", run, "--keep", "0.5"]) == 1
    err = capsys.readouterr().err
    assert f"belongs to the trajectory that diffin train (pid {proc.pid} on " in err
    proc.kill()
    proc.wait()
    assert main(["prune", "--run", run, "--keep", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "and that training stopped before it finished: run it again to resume it" in err
    argv = ["score", "--data", tiny_scored["data"], "--run", run, "--methods", "loss"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "has no finished training: the last `diffin train` stopped before it finished" in err
    (traj / "resume.pt").unlink()
    (traj / "request.json").unlink(missing_ok=True)
    assert main(argv) == 2
    assert "no trajectory in " in capsys.readouterr().err


def test_a_training_under_way_and_one_stopped_before_its_first_resume_state(
    holder, tiny_run, tmp_path
):
    """Walkthrough: both showed as "not trained", with a POOL placeholder to fill in."""
    import shlex

    from pipeline.cli import build_parser, train_config

    run = copy_run(tiny_run["run"], tmp_path / "run")
    demo = holder(run, "train,score", "demo")  # the demo holds train's lock throughout
    assert run_status(run)["train"]["state"] == "trained"
    (tmp_path / "run" / "trajectory" / "trajectory.json").rename(tmp_path / "t.json")
    assert run_status(run)["train"]["state"] == "training"  # its training, under way
    (tmp_path / "t.json").rename(tmp_path / "run" / "trajectory" / "trajectory.json")
    demo.kill()
    demo.wait()
    proc = holder(run, "train")
    status = run_status(run)
    assert status["train"]["state"] == "training" and "train     training" in describe(status)
    ProgressWriter(RunDir(run), steps=30, start=0, resumable_from=None).step(7, 2.5)
    assert "train     training, step 0 of 30 (" in describe(run_status(run))  # as written
    proc.kill()
    proc.wait()
    proc = holder(run, "train", "train --import")  # an import's is not a record of its own
    assert "train     training\n" in describe(run_status(run))
    proc.kill()
    proc.wait()
    (tmp_path / "run" / "trajectory" / "trajectory.json").unlink()  # as a training does
    status = run_status(run)
    assert status["train"]["state"] == "not trained"
    assert status["next_why"] == (
        "the last training stopped before it saved a resume state: this starts it again"
    )
    again = train_config(build_parser().parse_args(shlex.split(status["next"])[1:]))
    assert again.to_dict() == {**tiny_run["config"].to_dict(), "run": run}


def test_each_writing_stage_is_refused_after_its_config_checks(
    holder, tiny_scored, tmp_path, capsys
):
    """The stages hold their locks themselves (the demo, programs calling them): after
    their config checks, so that a mistyped command still says what is wrong (review)."""
    run = copy_run(tiny_scored["run"], tmp_path / "run")
    holder(run, "score,evaluate,report", "demo")
    data = tiny_scored["data"]
    assert main(["train", "--data", data, "--run", run, "--steps", "0"]) == 2  # config first
    assert "configuration error: --steps" in capsys.readouterr().err
    for argv in (
        ["train", "--data", data, "--run", run, "--model", "diffin-tiny", "--steps", "5"],
        ["evaluate", "--run", run, "--keep", "0.5", "--steps", "2"],
        ["report", "--run", run],
    ):
        assert main(argv) == 1, argv
        assert "is in use by diffin demo (pid " in capsys.readouterr().err
    assert not (tmp_path / "run" / "evaluate").exists()
    assert not (tmp_path / "run" / "report").exists()
    status = run_status(run)
    assert describe(status).count("running   diffin demo") == 1  # one line per process


def test_while_an_evaluation_runs_status_does_not_send_to_the_report(holder, tiny_scored, tmp_path):
    """Walkthrough: during an evaluate, next was `diffin report`, made stale by its end."""
    from pipeline.prune.config import PruneConfig
    from pipeline.prune.manifest import write_manifest

    run = copy_run(tiny_scored["run"], tmp_path / "run")
    write_manifest(PruneConfig(run=run, keep=0.5, name="half"))
    assert run_status(run)["next"] == f"diffin report --run {run}"
    holder(run, "evaluate", "evaluate")
    status = run_status(run)
    assert status["next"] == f"diffin status --run {run}"
    assert status["next_why"].startswith("diffin evaluate (pid ")
    # an earlier evaluation, stale: not its command, which would be refused (walkthrough)
    from pipeline.rundir import write_json

    config = {"run": run, "methods": ["diffin"], "keeps": [0.5], "fusions": [], "seeds": [0]}
    scores = {"columns": ["diffin"], "rows": 1, "uids": "x", "values": "y"}
    write_json(f"{run}/evaluate/evaluate.json", {"config": config, "results": [], "scores": scores})
    status = run_status(run)
    assert status["evaluate"]["stale"] and status["next"] == f"diffin status --run {run}"
