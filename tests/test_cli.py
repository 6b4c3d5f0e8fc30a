"""The `diffin` command: help, and configuration errors refused before any work, naming the field."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipeline.cli import build_parser, main

SUBCOMMANDS = ["make-data", "train", "score", "prune", "evaluate", "report", "demo"]


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for sub in SUBCOMMANDS:
        assert sub in out


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_subcommand_help(sub, capsys):
    with pytest.raises(SystemExit) as info:
        main([sub, "--help"])
    assert info.value.code == 0
    assert f"diffin {sub}" in capsys.readouterr().out


def test_score_help_names_every_registered_scorer(capsys):
    from pipeline.scorers import REGISTRY

    with pytest.raises(SystemExit):
        main(["score", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps long help lines
    assert "scorers: " + ", ".join(sorted(REGISTRY)) in out


def test_verbose_goes_before_or_after_the_subcommand_and_version_is_printed(capsys):
    # walkthrough: `diffin prune ... -v` was an unrecognised argument, --version unknown
    parse = build_parser().parse_args
    assert parse(["-v", "prune", "--run", "r"]).verbose is True
    assert parse(["prune", "--run", "r", "-v"]).verbose is True
    assert parse(["prune", "--run", "r"]).verbose is False
    with pytest.raises(SystemExit) as e:
        parse(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("diffin ")


def test_missing_subcommand_and_bad_choice_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["train", "--data", "x.tar", "--run", "r", "--spacing", "log"])
    assert info.value.code == 2
    assert "spacing" in capsys.readouterr().err


def test_typos_get_the_nearest_command_or_flag(capsys):
    with pytest.raises(SystemExit) as info:
        main(["scroe"])
    assert info.value.code == 2
    assert "did you mean 'score'?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["score", "--data", "d", "--run", "r", "--metods=loss", "--bach-size", "8"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: diffin score" in err
    assert "--metods=loss (did you mean '--methods'?)" in err
    assert "--bach-size (did you mean '--batch-size'?) 8" in err


def test_config_errors_name_the_flag_the_user_typed(tmp_path, capsys):
    (tmp_path / "0.tar").write_bytes(b"")
    data = str(tmp_path / "0.tar")
    err = _refused(
        ["train", "--data", data, "--run", str(tmp_path / "r"), "--batch-size", "1"], capsys
    )
    assert "configuration error: --batch-size: must be >= 2" in err
    assert not (tmp_path / "r").exists()


def _refused(argv: list[str], capsys, *words: str) -> str:
    t0 = time.time()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "configuration error" in err
    for w in words:
        assert w in err, (w, err)
    assert time.time() - t0 < 30  # refused up front, not after a stage ran
    return err


def _empty(path: Path) -> bool:
    return not path.exists() or not any(path.iterdir())


@pytest.mark.parametrize("keep", ["0", "1.5", "-0.2"])
def test_prune_bad_keep(tmp_path, capsys, keep):
    run = tmp_path / "run"
    _refused(["prune", "--run", str(run), "--keep", keep], capsys, "keep")
    assert _empty(run)


def test_prune_unknown_method(tiny_scored, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_scored["run"], run)
    _refused(["prune", "--run", str(run), "--keep", "0.5", "--method", "nope"], capsys, "method")
    assert not (run / "prune").exists()


def test_score_unknown_method(tiny_pool, tmp_path, capsys):
    run = tmp_path / "run"
    data = tiny_pool["train_data"]
    _refused(
        ["score", "--data", data, "--run", str(run), "--methods", "diffin,nope"],
        capsys,
        "methods",
        "nope",
    )
    assert _empty(run)


def test_score_without_methods(tiny_pool, tmp_path, capsys):
    """Walkthrough: `--methods ''` said "methods: unknown []"."""
    run = tmp_path / "run"
    argv = ["score", "--data", tiny_pool["train_data"], "--run", str(run), "--methods", ""]
    _refused(argv, capsys, "methods: none given")
    assert _empty(run)


def test_score_duplicate_method(tiny_pool, tmp_path, capsys):
    run = tmp_path / "run"
    data = tiny_pool["train_data"]
    _refused(
        ["score", "--data", data, "--run", str(run), "--methods", "loss,loss"],
        capsys,
        "methods",
    )
    assert _empty(run)


@pytest.mark.parametrize("command", ["train", "score"])
def test_shard_pattern_without_matches(tiny_run, tmp_path, capsys, command):
    run = tmp_path / "run"
    pattern = str(tmp_path / "pool" / "{00000..00003}.tar")
    _refused([command, "--data", pattern, "--run", str(run)], capsys, "data", pattern)
    assert _empty(run)


@pytest.mark.parametrize("command", ["train", "score"])
def test_reversed_brace_range(tiny_pool, tmp_path, capsys, command):
    run = tmp_path / "run"
    pattern = str(Path(tiny_pool["out"]) / "{00002..00000}.tar")
    _refused([command, "--data", pattern, "--run", str(run)], capsys, "data", "00002..00000")
    assert _empty(run)


def test_train_unknown_model(tiny_pool, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--data", tiny_pool["train_data"], "--run", str(run), "--model", "nope"]
    _refused(argv, capsys, "model", "nope")
    assert _empty(run)


@pytest.mark.parametrize(
    "flag,value,field",
    [("--steps", "0", "steps"), ("--lr", "-1", "lr"), ("--checkpoints", "0", "checkpoints")],
)
def test_train_bad_numbers(tiny_pool, tmp_path, capsys, flag, value, field):
    run = tmp_path / "run"
    argv = ["train", "--data", tiny_pool["train_data"], "--run", str(run), flag, value]
    _refused(argv, capsys, field)
    assert _empty(run)


def test_score_without_trajectory(tiny_pool, tmp_path, capsys):
    run = tmp_path / "run"
    _refused(["score", "--data", tiny_pool["train_data"], "--run", str(run)], capsys, "run")


def test_make_data_bad_noise(tmp_path, capsys):
    out = tmp_path / "pool"
    _refused(["make-data", str(out), "--noise", "1.5"], capsys, "noise")
    assert _empty(out)


@pytest.mark.parametrize(
    "flag,value,field",
    [("--keep", "2", "keep"), ("--method", "nope", "method"), ("--steps", "0", "steps")],
)
def test_demo_refuses_bad_config_before_generating_data(tmp_path, capsys, flag, value, field):
    run = tmp_path / "demo"
    _refused(["demo", "--run", str(run), flag, value], capsys, field)
    assert _empty(run)


@pytest.mark.parametrize("target", ["curated", "held-out"])
def test_demo_target_is_a_choice_not_a_shard_pattern(tmp_path, capsys, target):
    """--target of the demo names the target kind; it reaches the config check, not the shard one."""
    run = tmp_path / "demo"
    _refused(["demo", "--run", str(run), "--target", target, "--keep", "2"], capsys, "keep")
    assert _empty(run)


def test_make_data_bad_target_samples(tmp_path, capsys):
    out = tmp_path / "pool"
    _refused(["make-data", str(out), "--target-samples", "-1"], capsys, "--target-samples")
    assert _empty(out)


@pytest.mark.parametrize(
    "flag,value,field",
    [
        ("--keep", "1.5", "--keep: every fraction"),
        ("--methods", "nope", "methods"),
        ("--steps", "0", "steps"),
        ("--fuse", "nope=1,loss", "--fuse: no column 'nope'"),
        ("--fuse", "loss=0", "--fuse: weight of 'loss'"),
        ("--fusion-norm", "rank", "--fusion-norm: only used with --fuse"),
    ],
)
def test_evaluate_refuses_bad_config_before_training(
    tiny_scored, tmp_path, capsys, flag, value, field
):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_scored["run"], run)
    _refused(["evaluate", "--run", str(run), flag, value], capsys, field)
    assert not (run / "evaluate").exists()


def test_report_prints_the_page_path(tiny_scored, tmp_path, capsys):
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_scored["run"], run)
    assert main(["report", "--run", str(run), "--top", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["report"] == str(run / "report" / "index.html")
    assert (run / "report" / "index.html").stat().st_size > 1000


def test_train_pool_too_small_is_a_config_error(tiny_pool, tmp_path, capsys):
    # target_size (128) + batch_size (400) > 300 pairs: refused after reading, without a traceback
    run = tmp_path / "run"
    argv = ["train", "--data", tiny_pool["train_data"], "--run", str(run)]
    _refused(
        [*argv, "--model", "diffin-tiny", "--batch-size", "400", "--steps", "50"], capsys, "data"
    )
    assert not (run / "trajectory").exists()


def test_parser_defaults_match_the_readme():
    args = build_parser().parse_args(["score", "--data", "d", "--run", "r"])
    assert args.methods == ["diffin", "tracin", "random"]
    args = build_parser().parse_args(["score", "--data", "d", "--run", "r", "--methods", "a, b,"])
    assert args.methods == ["a", "b"]
    assert build_parser().parse_args(["score", "--data", "d", "--run", "r"]).sample_gradient == (
        "removal"
    )
    reference = ["score", "--data", "d", "--run", "r", "--sample-gradient", "reference"]
    assert build_parser().parse_args(reference).sample_gradient == "reference"
    assert build_parser().parse_args(["score", "--data", "d", "--run", "r"]).objective == "auto"


def test_the_objective_reaches_the_score_config(monkeypatch):
    seen = []
    monkeypatch.setattr("pipeline.cli.check_patterns", lambda args: None)
    monkeypatch.setattr("pipeline.score.driver.run_scoring", lambda cfg: seen.append(cfg) or {})
    main(["score", "--data", "d", "--run", "r", "--objective", "checkpoint-mean"])
    assert seen and seen[0].objective == "checkpoint-mean"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["score", "--data", "d", "--run", "r", "--objective", "mean"])


@pytest.mark.parametrize("top", ["0", "-1"])
def test_report_top_must_be_positive(tmp_path, capsys, top):
    with pytest.raises(SystemExit):
        main(["report", "--run", str(tmp_path / "run"), "--top", top])
    assert "must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["score", "train"])
def test_the_pixel_cap_is_a_positive_option(tmp_path, capsys, command):
    from pipeline.cli import _score_reader_options

    argv = [command, "--data", "d", "--run", str(tmp_path / "run")]
    args = build_parser().parse_args(argv)
    if command == "score":  # unset: the run's, else this (no trajectory here)
        assert args.max_image_pixels is None
        assert _score_reader_options(args)["max_image_pixels"] == 64_000_000
    else:
        assert args.max_image_pixels == 64_000_000
    assert build_parser().parse_args([*argv, "--max-image-pixels", "5"]).max_image_pixels == 5
    with pytest.raises(SystemExit):
        main([*argv, "--max-image-pixels", "0"])
    assert "must be >= 1" in capsys.readouterr().err


def test_make_data_names_its_own_flag_to_overwrite(tmp_path, capsys):
    out = tmp_path / "pool"
    assert main(["make-data", str(out), "--samples", "60", "--eval-samples", "8",
                 "--target-samples", "8"]) == 0  # fmt: skip
    capsys.readouterr()
    _refused(["make-data", str(out), "--samples", "70"], capsys, "--overwrite")


def test_demo_no_resume_reaches_the_config():
    assert build_parser().parse_args(["demo"]).resume
    assert not build_parser().parse_args(["demo", "--no-resume"]).resume


def test_plain_train_options_give_the_train_config_defaults():
    from pipeline.cli import train_config
    from pipeline.train.config import TrainConfig

    args = build_parser().parse_args(["train", "--data", "/d", "--run", "r"])
    assert train_config(args) == TrainConfig(data="/d", run="r")  # (local paths made absolute)
    args = build_parser().parse_args(["train", "--data", "d", "--run", "r", "--no-resume"])
    assert train_config(args).resume is False
    # --steps alone sizes the checkpoints as it sizes the warm-up (at most one per step)
    short = ["train", "--data", "d", "--run", "r", "--steps", "10"]
    assert train_config(build_parser().parse_args(short)).checkpoints == 10
    assert train_config(build_parser().parse_args([*short, "--checkpoints", "3"])).checkpoints == 3
    assert TrainConfig.checkpoints == 25 and TrainConfig.lr == 0.025  # docs/accuracy.md 2f


@pytest.mark.parametrize(
    "extra,flags",
    [
        (["--steps", "100"], ["--steps"]),
        (["--lr", "0.5", "--no-resume"], ["--lr", "--resume/--no-resume"]),
        (["--optimizer", "adamw", "--workers", "2"], ["--optimizer", "--workers"]),
    ],
)
def test_training_options_given_with_import_are_refused(tiny_pool, tmp_path, capsys, extra, flags):
    """--import takes how the run trained from params.txt (was: these were silently ignored)."""
    run = tmp_path / "run"
    argv = ["train", "--import", str(tmp_path / "oc"), "--data", tiny_pool["train_data"]]
    err = _refused([*argv, "--run", str(run), *extra], capsys, *flags, "--import")
    assert "params.txt" in err
    assert not run.exists()


def test_steps_per_epoch_without_import_is_refused(tiny_pool, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--data", tiny_pool["train_data"], "--run", str(run)]
    _refused([*argv, "--steps-per-epoch", "10"], capsys, "--steps-per-epoch", "--import")
    assert not run.exists()


def test_train_sizes_its_warm_up_from_the_steps_unless_given():
    """`diffin train --steps 30` failed on the 40-step default warm-up (as the demo once did)."""
    from pipeline.cli import train_config

    def cfg(*extra):
        return train_config(
            build_parser().parse_args(["train", "--data", "d", "--run", "r", *extra])
        )

    assert cfg().warmup == 40  # the 400-step default is unchanged
    assert cfg("--steps", "30").warmup == 3
    # a tenth up to 40, as the README says (walkthrough: --steps 60 warmed up for 40 steps)
    assert cfg("--steps", "60").warmup == 6 and cfg("--steps", "1600").warmup == 40
    assert cfg("--steps", "30", "--warmup", "0").warmup == 0
    cfg("--steps", "30").validate()


def test_local_paths_are_recorded_absolute_and_max_samples_is_a_flag(tmp_path, monkeypatch):
    """Walkthrough: `--data pool/...` was recorded as typed, so evaluate and report run from
    another directory looked for the pool there; the 100,000-pair cap had no flag."""
    from pipeline.cli import absolute_paths, train_config
    from pipeline.prune.config import PruneConfig

    monkeypatch.chdir(tmp_path)
    argv = ["train", "--data", "pool/{00000..00002}.tar::s3://b/x.tar", "--run", "r"]
    args = build_parser().parse_args([*argv, "--max-samples", "5000"])
    absolute_paths(args)  # as main does, before any config is made
    cfg = train_config(args)
    assert cfg.data == f"{tmp_path}/pool/{{00000..00002}}.tar::s3://b/x.tar"
    from pipeline.data.shards import absolute_pattern

    chained = "simplecache::/abs/x.tar::a.tar"  # review: the chain became a path
    assert absolute_pattern(chained) == f"simplecache::/abs/x.tar::{tmp_path}/a.tar"
    assert cfg.max_samples == 5000
    assert train_config(build_parser().parse_args(argv)).max_samples == 100_000
    fused = PruneConfig(run="r", keep=0.5, fusion={"diffin": 1, "loss": 1}).to_dict()
    assert fused["method"] is None  # was "diffin", though ranked by the fusion


def test_relative_paths_are_refused_inside_a_ray_job(tmp_path, monkeypatch, capsys):
    """Walkthrough: `jobs/stage.py train --run runs/r3` succeeded, writing the run into the
    job's temporary copy of the working directory, where it was lost."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray sets for a job
    _refused(["prune", "--run", "runs/r3", "--keep", "0.5"], capsys, "--run", "Ray job")
    argv = ["score", "--data", "/abs/{0..1}.tar::rel/x.tar", "--run", "/abs/run"]
    _refused(argv, capsys, "--data", "'rel/x.tar'", "absolute path or a URL")
    _refused(["make-data", "pool"], capsys, "out: 'pool'")
    assert not list(tmp_path.iterdir())
    # absolute paths and URLs go on (here to the next check: no score table)
    _refused(["prune", "--run", str(tmp_path / "run"), "--keep", "0.5"], capsys, "score table")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")  # outside a job, relative is fine
    _refused(["prune", "--run", "runs/r3", "--keep", "0.5"], capsys, "score table")


def test_abbreviated_flags_are_refused(capsys):
    """`score --method diffin` was taken for `--methods diffin` and rewrote the table."""
    with pytest.raises(SystemExit):
        main(["score", "--data", "d", "--run", "r", "--method", "diffin"])
    assert "unrecognized arguments: --method" in capsys.readouterr().err


def test_negative_numbers_in_scientific_notation_are_values_not_options():
    """Walkthrough: `--threshold -1e-7` (TracIn scores are that small) was "expected one
    argument"; only plain decimals such as -0.5 were taken as numbers."""
    for value in ("-1e-7", "-2.5E+3", "-.5", "-3", "-0.0000001"):
        args = build_parser().parse_args(
            ["prune", "--run", "r", "--rule", "threshold", "--threshold", value]
        )
        assert args.threshold == float(value)
    with pytest.raises(SystemExit):  # an option is still an option
        build_parser().parse_args(["prune", "--run", "r", "--threshold", "-v2"])


def test_an_interrupted_command_says_how_to_continue(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("pipeline.cli.check_patterns", lambda args: None)
    monkeypatch.setattr("pipeline.cli.run", interrupted)
    assert main(["score", "--data", "d", "--run", "r"]) == 130
    err = capsys.readouterr().err
    assert "interrupted; run the same command again" in err and "Traceback" not in err


def test_sigterm_takes_the_interrupt_path(monkeypatch, capsys):
    """`kill`, `timeout`, Kubernetes and `ray job stop` send SIGTERM (walkthrough)."""
    import os
    import signal

    def terminated(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
        except KeyboardInterrupt:
            # what Ray does when the signal comes while ray.get / ray.wait / Ray Train's
            # fit waits: a plain KeyboardInterrupt in its place (review)
            raise KeyboardInterrupt from None

    monkeypatch.setattr("pipeline.cli.check_patterns", lambda args: None)
    monkeypatch.setattr("pipeline.cli.run", terminated)
    before = signal.getsignal(signal.SIGTERM)
    try:
        t0 = time.time()
        assert main(["score", "--data", "d", "--run", "r"]) == 143
    finally:
        signal.signal(signal.SIGTERM, before)
    assert time.time() - t0 < 4
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler again
    err = capsys.readouterr().err
    assert "terminated (SIGTERM); run the same command again" in err
    # a Ctrl-C after a SIGTERM-stopped command is an interrupt again
    monkeypatch.setattr("pipeline.cli.run", lambda args: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["score", "--data", "d", "--run", "r"]) == 130


def test_typo_suggestions_read_the_choices_of_every_python(capsys):
    """Python 3.12.8+ lists the choices unquoted (gh-117766), 3.11 quoted (review)."""
    from pipeline.cli import _Parser

    for choices in ("'make-data', 'train', 'score'", "make-data, train, score"):
        with pytest.raises(SystemExit):
            _Parser(prog="diffin").error(
                f"argument command: invalid choice: 'scroe' (choose from {choices})"
            )
        assert "(did you mean 'score'?)" in capsys.readouterr().err, choices


def test_fields_named_otherwise_on_the_command_line_get_their_flag(tmp_path, capsys):
    """Review: `evaluate --keep 0` said "keeps: ..."."""
    err = _refused(["evaluate", "--run", str(tmp_path), "--keep", "0"], capsys)
    assert "configuration error: --keep: " in err
    assert "keeps" not in err


def test_a_diverged_training_is_one_line_not_a_traceback(monkeypatch, capsys):
    """Walkthrough: "training diverged at step 0 (loss nan); lower --lr" came at the end of
    a traceback."""

    def diverged(args):
        raise FloatingPointError("training diverged at step 0 (loss nan); lower --lr")

    monkeypatch.setattr("pipeline.cli.check_patterns", lambda args: None)
    monkeypatch.setattr("pipeline.cli.run", diverged)
    assert main(["train", "--data", "d", "--run", "r"]) == 1
    err = capsys.readouterr().err
    assert err == "diffin train: training diverged at step 0 (loss nan); lower --lr\n"


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--workers WORKERS (default: 2)" in out
    assert "(default: diffin,tracin,random)" in out  # as --methods is written
    assert "--seed SEED (default: 0)" in out
    assert "METHOD.md" not in out  # a file users do not have
    assert "the second-order part alone --second-order" in out  # a switch: no "(default: True)"
    assert "(default: True)" not in out
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    assert "(default: 1000)" in capsys.readouterr().out


def test_local_paths_are_made_absolute_before_anything_records_them(tmp_path, monkeypatch):
    """Walkthrough: --run and --import were recorded as typed ("runs/imp", "oclogs/ocrun"),
    so run.json and the report named no file from elsewhere. --pretrained stays as typed:
    its string is in the training fingerprint (review)."""
    from pipeline.cli import absolute_paths, build_parser

    monkeypatch.chdir(tmp_path)
    parse = build_parser().parse_args
    args = parse(["train", "--import", "oclogs/ocrun", "--data", "pool/{0..1}.tar", "--run", "r"])
    absolute_paths(args)
    assert (args.import_dir, args.run) == (f"{tmp_path}/oclogs/ocrun", f"{tmp_path}/r")
    assert args.data == f"{tmp_path}/pool/{{0..1}}.tar"
    args = parse(["train", "--data", "s3://b/{0..1}.tar", "--run", "s3://b/r"])
    args.pretrained = "~/w.pt"
    absolute_paths(args)
    assert (args.pretrained, args.data, args.run) == ("~/w.pt", "s3://b/{0..1}.tar", "s3://b/r")


def test_a_relative_run_is_recorded_absolute_through_main(tiny_scored, tmp_path, monkeypatch):
    # the path main takes, read back from run.json (review: the unit test alone passed
    # with absolute_paths dropped from the command path)
    import json
    import shutil

    shutil.copytree(tiny_scored["run"], tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    assert main(["prune", "--run", "run", "--keep", "0.5", "--name", "half"]) == 0
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["prune/half"]["config"]["run"] == str(tmp_path / "run")


def test_a_stage_that_cannot_go_on_says_why_in_one_line(monkeypatch, capsys):
    """Its message says what to do; a traceback would bury it under Ray's own logs."""
    import pipeline.cli as cli
    from pipeline.errors import StageFailed

    def fails(args):
        raise StageFailed("2 scoring actors in a row failed to start; last: X")

    monkeypatch.setattr(cli, "run", fails)
    assert cli.main(["prune", "--run", "r", "--keep", "0.5"]) == 1
    err = capsys.readouterr().err
    assert err == "diffin prune: 2 scoring actors in a row failed to start; last: X\n"


def test_score_reads_the_pool_as_the_proxy_was_trained_unless_told(tmp_path, caplog):
    """Walkthrough: a proxy trained with --image-key image --text-key caption was scored
    with the defaults, and every row failed after a full pass over the pool."""
    from pipeline.cli import _score_reader_options, build_parser
    from pipeline.rundir import write_json
    from pipeline.score.config import ScoreConfig
    from pipeline.score.driver import warn_about_reader

    run = tmp_path / "run"
    trained = {"image_keys": ["image"], "text_keys": ["caption"], "max_image_pixels": 4096}
    write_json(str(run / "trajectory" / "trajectory.json"), {"config": trained})
    parse = build_parser().parse_args
    # the proxy's keys first, then the defaults: another pool of the usual layout reads too
    as_trained = {
        "image_keys": ["image", "jpg", "jpeg", "png", "webp"],
        "text_keys": ["caption", "txt"],
        "max_image_pixels": 4096,
    }
    args = parse(["score", "--data", "d", "--run", str(run)])
    with caplog.at_level("INFO", logger="pipeline.score.trajectory"):
        assert _score_reader_options(args) == as_trained
    assert "unless given, the pool is read with image_keys=['image', 'jpg'" in caplog.text
    assert "(as the proxy was trained)" in caplog.text
    caplog.clear()
    args = parse(["score", "--data", "d", "--run", str(run), "--text-key", "txt"])
    assert _score_reader_options(args) == {**as_trained, "text_keys": ["txt"]}
    # a run scored before reads as it did (review: a resumed command rescored every part)
    last = {"image_keys": ["jpg"], "text_keys": ["txt"], "max_image_pixels": 99}
    ckpts = [{"sha256": "a", "step": 10, "lr": 0.1}]
    write_json(
        str(run / "trajectory" / "trajectory.json"), {"config": trained, "checkpoints": ckpts}
    )
    scored = {"hash": "h", "reader": last, "checkpoints": [["a", 10, 0.1]]}
    write_json(str(run / "scores" / "fingerprint.json"), scored)
    assert _score_reader_options(parse(["score", "--data", "d", "--run", str(run)])) == last
    # ... unless the proxy was trained again since: its keys may be another pool's (walkthrough)
    write_json(
        str(run / "scores" / "fingerprint.json"), {**scored, "checkpoints": [["b", 10, 0.1]]}
    )
    assert _score_reader_options(parse(["score", "--data", "d", "--run", str(run)])) == as_trained
    args = parse(["score", "--data", "d", "--run", str(tmp_path / "untrained")])
    assert _score_reader_options(args) == {
        "image_keys": ["jpg", "jpeg", "png", "webp"],
        "text_keys": ["txt"],
        "max_image_pixels": 64_000_000,
    }
    # read otherwise than trained (a spec, or a flag): said
    cfg = ScoreConfig(data="d", run=str(run), image_keys=["image"], text_keys=["txt"])
    with caplog.at_level("WARNING", logger="pipeline.score.driver"):
        warn_about_reader(cfg, trained)
    assert "--text-key, --max-image-pixels: the proxy was trained reading its pool with " in (
        caplog.text
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.score.driver"):
        warn_about_reader(ScoreConfig(data="d", run="r", **trained), trained)
        warn_about_reader(ScoreConfig(data="d", run="r", **as_trained), trained)
    assert caplog.text == ""


def test_a_recorded_config_gives_back_a_command_that_parses_to_it():
    """`diffin status` prints commands from recorded configs; pasted, they must give back the
    same options (walkthrough: its lines had prose in them, and lost --methods)."""
    import shlex
    from dataclasses import asdict

    from pipeline.cli import command_for
    from pipeline.prune.config import PruneConfig
    from pipeline.score.config import ScoreConfig

    score = ScoreConfig(
        data="pool/{00000..00002}.tar",
        run="runs/my run",
        methods=["tracin", "loss"],
        target="t/{0..1}.tar",
        first_order=False,
        image_keys=["image", "jpg"],
        seed=3,
    )
    args = build_parser().parse_args(shlex.split(command_for("score", asdict(score)))[1:])
    assert (args.data, args.run, args.methods, args.target) == (
        score.data,
        score.run,
        score.methods,
        score.target,
    )
    assert (args.first_order, args.image_key, args.seed) == (False, ["image", "jpg"], 3)
    for resume in (False, True):  # --no-resume / --resume, not "--resume False"
        line = command_for("train", {"data": "p.tar", "run": "r", "resume": resume})
        assert build_parser().parse_args(shlex.split(line)[1:]).resume is resume, line
    for prune in (
        PruneConfig(run="r", keep=0.5, fusion={"diffin": 1.0, "loss": 0.5}, name="x"),
        PruneConfig(run="r", rule="threshold", threshold=1e-5, method="loss"),
        PruneConfig(run="r", keep=0.3, rule="balanced", balance_by="cluster", clusters=4),
    ):
        line = command_for("prune", prune.to_dict())
        again = build_parser().parse_args(shlex.split(line)[1:])
        from pipeline.cli import _prune_config

        assert _prune_config(again).to_dict() == {
            **prune.to_dict(),
            **{
                k: v
                for k, v in _prune_config(again).to_dict().items()
                if prune.to_dict()[k] is None
            },
        }, line


def test_a_score_stopped_while_preparing_says_so_in_progress_json(tmp_path, monkeypatch):
    """Walkthrough: a rescore still computing its directions showed as the earlier table;
    progress.json now says "preparing", and "interrupted" if it stops there. A run refused
    while preparing did not run: the records stay as they were (review)."""
    import json

    import pipeline.score.driver as driver
    from pipeline.errors import ConfigError
    from pipeline.score.config import ScoreConfig

    raised: list[BaseException] = [KeyboardInterrupt()]

    def stopped(cfg, run, actor_cls, *prepared):
        assert json.load(open(f"{tmp_path}/scores/progress.json")) == {"state": "preparing"}
        raise raised[0]

    monkeypatch.setattr(driver, "_score", stopped)
    monkeypatch.setattr(driver, "resolve_shards", lambda data: ["/p/00000.tar"])
    monkeypatch.setattr(driver, "load_trajectory", lambda run: None)
    monkeypatch.setattr(driver, "resolve_form", lambda form, traj: form)
    cfg = ScoreConfig(data="d", run=str(tmp_path), methods=["loss"], target="t.tar")
    with pytest.raises(KeyboardInterrupt):
        driver.run_scoring(cfg)
    assert json.load(open(f"{tmp_path}/scores/progress.json")) == {"state": "interrupted"}
    request = json.load(open(f"{tmp_path}/scores/request.json"))
    assert (request["methods"], request["target"]) == (["loss"], "t.tar")

    raised[0] = ConfigError("second_order: refused")
    with pytest.raises(ConfigError):
        driver.run_scoring(ScoreConfig(data="d", run=str(tmp_path), methods=["tracin"]))
    assert json.load(open(f"{tmp_path}/scores/progress.json")) == {"state": "interrupted"}
    assert json.load(open(f"{tmp_path}/scores/request.json"))["methods"] == ["loss"]
