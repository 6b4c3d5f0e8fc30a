"""jobs/: the `ray job submit` entrypoints and their runtime environment.

The entrypoint itself runs on a real cluster in tests/score/test_faults.py; here
its argument handling and the runtime environment are checked without Ray.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
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


def test_submit_script_uses_existing_flags():
    from pipeline.cli import build_parser

    text = (JOBS / "submit.sh").read_text()
    calls = re.findall(r"^submit (python jobs/\S+\.py .*)$", text, re.M)
    assert len(calls) == 3
    for call in calls:
        words = shlex.split(re.sub(r"\"\$\{?(\w+)\}?\"", "1", call))
        argv = words[2:] if words[1] == "jobs/stage.py" else ["score", *words[2:]]
        build_parser().parse_args(argv)
