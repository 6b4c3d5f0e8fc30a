"""jobs/: the `ray job submit` entrypoints and their runtime environment.

The entrypoint itself runs on a real cluster in tests/score/test_faults.py; here
its argument handling and the runtime environment are checked without Ray.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
JOBS = REPO / "jobs"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"jobs_{name}", JOBS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_runtime_env_is_valid():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((JOBS / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # raises on unknown or malformed fields
    assert env["working_dir"] == "."
    assert ".venv/" in env["excludes"]
    assert all(isinstance(v, str) for v in env["env_vars"].values())


def test_score_entrypoint_adds_address_auto(monkeypatch):
    mod = _module("score")
    seen = []
    monkeypatch.setattr("pipeline.cli.main", lambda argv: seen.append(argv) or 0)
    assert mod.main(["--data", "p/{0..1}.tar", "--run", "r"]) == 0
    assert seen[-1] == ["score", "--data", "p/{0..1}.tar", "--run", "r", "--address", "auto"]
    mod.main(["--data", "d", "--run", "r", "--address=ray://h:10001"])
    assert seen[-1].count("--address=ray://h:10001") == 1 and "auto" not in seen[-1]
    # -v is diffin's flag, before the subcommand (was: "unrecognized arguments", review)
    mod.main(["--data", "d", "-v", "--run", "r"])
    assert seen[-1] == ["-v", "score", "--data", "d", "--run", "r", "--address", "auto"]


def test_stage_entrypoint(monkeypatch, capsys):
    mod = _module("stage")
    seen = []
    monkeypatch.setattr("pipeline.cli.main", lambda argv: seen.append(argv) or 0)
    assert mod.main(["prune", "--run", "r", "--keep", "0.5"]) == 0
    assert seen == [["prune", "--run", "r", "--keep", "0.5"]]
    # every stage that runs in the driver, as the operations guide lists them
    for stage in ("make-data", "train", "evaluate", "report"):
        assert mod.main([stage, "--run", "r"]) == 0 and seen[-1] == [stage, "--run", "r"]
    assert mod.main(["score"]) == 2 and "usage" in capsys.readouterr().err
    assert mod.main(["--help"]) == 0 and "train" in capsys.readouterr().out  # review
    assert mod.main(["-v", "prune", "--run", "r"]) == 0 and seen[-1] == [
        "-v",
        "prune",
        "--run",
        "r",
    ]
    assert mod.main(["prune", "--verbose", "--run", "r"]) == 0
    assert seen[-1] == ["--verbose", "prune", "--run", "r"]


@pytest.mark.parametrize(
    "script, args",
    [
        ("score.py", ["--help"]),
        ("stage.py", ["train", "--help"]),
        ("stage.py", ["evaluate", "--help"]),
        ("stage.py", ["report", "--help"]),
    ],
)
def test_entrypoints_run_as_scripts(script, args):
    out = subprocess.run(
        [sys.executable, str(JOBS / script), *args], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "--run" in out.stdout


def test_submit_script_uses_existing_flags(tmp_path):
    """Run with a `ray` that records its arguments: every stage's flags parse, and the
    optional settings reach them (walkthrough: the model was fixed and there was no
    --target, --steps or --threads)."""
    import json
    import os

    from pipeline.cli import build_parser

    log = tmp_path / "calls.jsonl"
    fake = tmp_path / "bin" / "ray"
    fake.parent.mkdir()
    status = tmp_path / "status"
    status.write_text("SUCCEEDED")
    # `ray job status` as Ray prints it: its own function, given the status (walkthrough:
    # a fake "Status for job: SUCCEEDED" hid that Ray 2.60 prints "Job 'ID' succeeded",
    # which the script took for a failure after the first stage)
    # The status file holds the states the job goes through, one per `ray job status` call
    # (the last one stays). `ray job logs --follow` fails when LOGS_DROP is set: a tunnel
    # that closed while the job went on (review).
    fake.write_text(
        f"#!{sys.executable}\nimport json, os, sys, types\n"
        "if sys.argv[1:3] == ['job', 'status']:\n"
        "    from ray.dashboard.modules.job.cli import _log_job_status\n"
        "    from ray.job_submission import JobStatus\n"
        f"    states = open({str(status)!r}).read().split()\n"
        f"    open({str(status)!r}, 'w').write(' '.join(states[1:] or states))\n"
        "    info = types.SimpleNamespace(status=JobStatus[states[0]], message='train succeeded, then died')\n"
        "    _log_job_status(types.SimpleNamespace(get_job_info=lambda _: info), sys.argv[-1])\n"
        "    sys.exit(0)\n"
        "if sys.argv[1:3] == ['job', 'logs']:\n"
        "    sys.exit(1 if os.environ.get('LOGS_DROP') else 0)\n"
        "assert sys.argv[1:4] == ['job', 'submit', '--no-wait'], sys.argv\n"
        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    fake.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{fake.parent}:{os.environ['PATH']}",
        "DATA": "/abs/pool/{00000..00001}.tar",
        "RUN": "/abs/run",
        "POLL": "0",
    }
    full = {"MODEL": "diffin-tiny", "STEPS": "60", "TARGET": "/t.tar", "THREADS": "1", "GPUS": "1"}
    for extra in ({}, full):
        log.unlink(missing_ok=True)
        subprocess.run(["bash", str(JOBS / "submit.sh")], env={**env, **extra}, check=True)
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        assert [c[c.index("--") + 2] for c in calls] == [
            "jobs/stage.py",
            "jobs/score.py",
            "jobs/stage.py",
            "jobs/stage.py",
        ]
        parsed = []
        for call in calls:
            words = call[call.index("--") + 2 :]
            argv = words[1:] if words[0] == "jobs/stage.py" else ["score", *words[1:]]
            parsed.append(build_parser().parse_args(argv))
        train, score, prune, report = parsed
        assert (train.command, prune.command, report.command) == ("train", "prune", "report")
        assert train.model == extra.get("MODEL", "diffin-small") and score.workers == 4
        if extra:
            assert (train.steps, score.target, score.threads) == (60, "/t.tar", 1)
            assert train.threads == 0  # an actor's share is no size for the training driver
            assert score.gpus_per_worker == 1
        else:
            assert score.gpus_per_worker is None
    # A stage stopped with `ray job stop` (submit exits 0 for it), or failed with a message
    # that says "succeeded": the next is not submitted
    for end in ("STOPPED", "FAILED"):
        status.write_text(end)
        log.unlink()
        done = subprocess.run(
            ["bash", str(JOBS / "submit.sh")], env=env, capture_output=True, text=True
        )
        assert done.returncode == 1 and "did not succeed" in done.stderr
        assert len(log.read_text().splitlines()) == 1
    # The log stream drops while the job is still running: the script waits for its end
    # and goes on after a success (it stopped with "did not succeed", review)
    status.write_text("PENDING RUNNING RUNNING SUCCEEDED")
    log.unlink()
    done = subprocess.run(
        ["bash", str(JOBS / "submit.sh")],
        env={**env, "LOGS_DROP": "1"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "lost the log stream" in done.stderr
    assert len(log.read_text().splitlines()) == 4
    status.write_text("RUNNING FAILED")
    log.unlink()
    done = subprocess.run(
        ["bash", str(JOBS / "submit.sh")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 1 and "did not succeed" in done.stderr
    assert len(log.read_text().splitlines()) == 1
