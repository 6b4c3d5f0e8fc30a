"""`diffin status`: each stage's state read from a run's records, and the next command."""

from __future__ import annotations

import json
import shlex
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.errors import ConfigError
from pipeline.rundir import write_json
from pipeline.status import describe, run_status
from tests.conftest import copy_run


def test_an_empty_run_says_to_train_and_a_missing_one_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    status = run_status(str(tmp_path / "run"))
    assert status["train"] == {"state": "not trained"}
    assert status["score"]["state"] == "not scored" and status["prune"] == []
    assert status["next"] == f"diffin train --data POOL --run {tmp_path}/run"
    assert status["next_why"] == "POOL: the pool's shards"
    with pytest.raises(ConfigError, match="^run: .* does not exist"):
        run_status(str(tmp_path / "typo"))
    (tmp_path / "afile").write_text("x")  # walkthrough: an empty run, exit 0
    with pytest.raises(ConfigError, match="^run: .*afile is a file; run names a directory"):
        run_status(str(tmp_path / "afile"))


def test_a_run_walks_through_its_stages(tiny_scored, tmp_path, capsys):
    from pipeline.prune.config import PruneConfig
    from pipeline.prune.manifest import write_manifest
    from pipeline.report.build import build_report

    run = copy_run(tiny_scored["run"], tmp_path / "run")
    rows = pq.read_metadata(f"{run}/scores.parquet").num_rows
    status = run_status(run)
    assert status["train"]["state"] == "trained" and status["train"]["model"] == "diffin-tiny"
    assert status["score"]["state"] == "scored"
    assert status["score"]["table"]["rows"] == rows
    assert status["score"]["table"]["methods"] == ["diffin", "tracin", "loss", "random"]
    # a column the table has, so that the command runs as printed (walkthrough)
    assert status["next"] == f"diffin prune --run {run} --keep 0.7 --method diffin"

    write_manifest(PruneConfig(run=run, keep=0.5, name="half"))
    status = run_status(run)
    assert [(m["name"], m["keep"], m["stale"]) for m in status["prune"]] == [("half", 0.5, False)]
    assert status["next"] == f"diffin report --run {run}"
    time.sleep(0.05)
    build_report(run, top=2)
    status = run_status(run)
    assert status["report"]["older_than"] == []
    args = json.load(open(f"{run}/prune/half/manifest.json"))["open_clip_args"]
    assert status["next"] == f"python -m open_clip_train.main {args}"
    assert "--train-data" in args and status["next_why"].startswith("retrain on half, the newest")

    # rescored with other values: the manifest ranks an earlier table, the report is older
    time.sleep(1.1)  # a second: the stores' modification times
    table = pq.read_table(f"{run}/scores.parquet")
    values = table.column("diffin").to_numpy(zero_copy_only=False) + 1.0
    i = table.schema.get_field_index("diffin")
    pq.write_table(table.set_column(i, "diffin", pa.array(values, mask=np.isnan(values))),
                   f"{run}/scores.parquet")  # fmt: skip
    status = run_status(run)
    assert status["prune"][0]["stale"] and status["report"]["older_than"] == ["the scores"]
    # the manifest's own options, as a command that runs as printed (walkthrough)
    assert status["next"] == f"diffin prune --run {run} --keep 0.5 --method diffin --name half"
    text = describe(status)
    assert "prune     half: " in text and "(keep 0.5, by diffin) [ranks an earlier table]" in text
    assert "[older than the scores]" in text

    assert main(["status", "--run", run, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["prune"][0]["name"] == "half" and printed["next"] == status["next"]
    assert main(["status", "--run", run]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"run       {run}"


def test_an_interrupted_score_and_an_unfinished_training_are_said(tiny_run, tiny_scored, tmp_path):
    run = copy_run(tiny_scored["run"], tmp_path / "run")
    (tmp_path / "run" / "scores.parquet").unlink()
    progress = {"state": "interrupted", "shards_done": 2, "shards_total": 4, "samples_total": 8}
    write_json(f"{run}/scores/progress.json", progress)
    status = run_status(run)
    assert status["score"]["state"] == "interrupted"
    data = shlex.quote(tiny_scored["data"])  # a brace pattern, quoted for the shell
    assert status["next"] == f"diffin score --data {data} --run {run}"
    assert "(last run interrupted: 2/4 shards, progress written " in describe(status)
    # with the last run's own options (walkthrough: its --methods and --target were lost)
    request = {**tiny_scored["config"].to_dict(), "methods": ["tracin", "loss"], "target": "t.tar"}
    write_json(f"{run}/scores/request.json", request)
    status = run_status(run)
    assert status["next"].startswith(
        f"diffin score --data {data} --run {run} --methods tracin,loss"
    )
    assert " --target t.tar" in status["next"]

    (tmp_path / "run" / "trajectory" / "trajectory.json").unlink()
    (tmp_path / "run" / "trajectory" / "resume.pt").write_bytes(b"")
    status = run_status(run)
    assert status["train"]["state"] == "unfinished"
    assert status["train"]["resume_written_s_ago"] is not None
    assert (
        "resumes the training, which stopped before it finished (no diffin process holds"
        in (status["next_why"])
    )
    # the training's every option, --threads and --no-resume's opposite included
    from pipeline.cli import build_parser, train_config

    request = {**tiny_run["config"].to_dict(), "threads": 2, "resume": False}
    write_json(f"{run}/trajectory/request.json", request)
    status = run_status(run)
    again = train_config(build_parser().parse_args(shlex.split(status["next"])[1:]))
    assert again.to_dict() == {**request, "run": run, "resume": True}, status["next"]
    assert "not recorded" not in status["next_why"]
    # a training from before request.json: what its fingerprint was made of, and a word
    (tmp_path / "run" / "trajectory" / "request.json").unlink()
    status = run_status(run)
    assert status["next"] == f"diffin train --data POOL --run {run}"  # no options recorded
    assert "(--workers, --address, --threads) are not recorded" in status["next_why"]


def test_a_stale_evaluation_gets_a_command_evaluate_accepts(tiny_scored, tmp_path):
    """Review: evaluate.json records fusion_norm "zscore", and `--fusion-norm` without
    `--fuse` is refused: the printed command failed for every stale evaluation."""
    import shlex

    from pipeline.cli import build_parser
    from pipeline.prune.config import PruneConfig
    from pipeline.prune.manifest import write_manifest
    from pipeline.report.build import build_report

    run = copy_run(tiny_scored["run"], tmp_path / "run")
    write_manifest(PruneConfig(run=run, keep=0.5, name="half"))
    config = {"run": run, "methods": ["diffin"], "keeps": [0.5, 0.7], "fusions": [],
              "fusion_norm": "zscore", "seeds": [0], "full": False}  # fmt: skip
    write_json(f"{run}/evaluate/evaluate.json", {"config": config, "results": [], "scores": {
        "columns": ["diffin"], "rows": 1, "uids": "x", "values": "y"}})  # fmt: skip
    build_report(run, top=2)
    status = run_status(run)
    assert status["evaluate"]["stale"]
    line = status["next"]
    # --keep 0.5 0.7 is evaluate's default: left out
    assert line == f"diffin evaluate --run {run} --methods diffin --no-full"
    args = build_parser().parse_args(shlex.split(line)[1:])
    assert (args.keep, args.methods, args.full) == ([0.5, 0.7], ["diffin"], False)


def test_status_piped_into_head_ends_without_a_traceback(tiny_scored, tmp_path):
    """Walkthrough: `diffin status --json | head` ended in a BrokenPipeError traceback."""
    import subprocess
    import sys
    from pathlib import Path

    run = copy_run(tiny_scored["run"], tmp_path / "run")
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        f"{sys.executable} -m pipeline.cli status --run {run} --json | head -c 1",
        shell=True,
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout == "{" and "Traceback" not in done.stderr, done.stderr
