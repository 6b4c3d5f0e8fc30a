"""Proxy training: the recorded trajectory, determinism, held-out sets, the training loop."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.model import factory
from pipeline.rundir import RunDir
from pipeline.tensors import load_tensors
from pipeline.train.config import TrainConfig
from pipeline.train.loop import batch_order, train_loop
from pipeline.train.schedule import checkpoint_steps, lr_at
from pipeline.train.trajectory import load_pool, train


def _traj(run: str) -> dict:
    return json.loads((Path(run) / "trajectory" / "trajectory.json").read_text())


def test_records_m_checkpoints_with_schedule_steps_and_lrs(tiny_run):
    cfg: TrainConfig = tiny_run["config"]
    rec = _traj(tiny_run["run"])
    want_steps = checkpoint_steps(cfg.steps, cfg.checkpoints, cfg.spacing, cfg.seed)
    assert [c["step"] for c in rec["checkpoints"]] == want_steps
    assert len(rec["checkpoints"]) == cfg.checkpoints
    for c in rec["checkpoints"]:
        assert c["lr"] == pytest.approx(
            lr_at(c["step"], cfg.lr, cfg.warmup, cfg.steps, cfg.schedule)
        )
    assert rec == json.loads(json.dumps(tiny_run["record"], default=str))
    assert rec["model"] == "diffin-tiny"
    assert rec["steps"] == cfg.steps
    assert rec["config"] == cfg.to_dict()
    # the thread count that set the float rounding, whatever --threads said
    assert rec["torch_threads"] == (cfg.threads or torch.get_num_threads())


def test_checkpoint_sha256_matches_files_and_loads_without_pickle(tiny_run):
    run = RunDir(tiny_run["run"])
    rec = _traj(tiny_run["run"])
    names = {n for n, _ in factory.create("diffin-tiny").model.named_parameters()}
    for c in rec["checkpoints"]:
        path = Path(run.checkpoint(c["step"]))
        assert path.name == c["path"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == c["sha256"]
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert names <= set(state)
    # the checkpoints differ: training moved theta between them
    a, b = (torch.load(run.checkpoint(c["step"]), weights_only=True) for c in rec["checkpoints"])
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_pool_counts_and_target_held_out(tiny_run, tiny_pool):
    cfg: TrainConfig = tiny_run["config"]
    rec = _traj(tiny_run["run"])
    assert rec["pool"]["rows_read"] == tiny_pool["samples"]
    assert rec["pool"]["target"] == cfg.target_size
    assert rec["pool"]["reference"] == cfg.reference_size
    ok = rec["pool"]["rows_read"] - rec["pool"]["errors"]
    assert rec["n_train"] == ok - cfg.target_size

    run = RunDir(tiny_run["run"])
    target_t, target_meta = load_tensors(run.set_file("target"))
    ref_t, ref_meta = load_tensors(run.set_file("reference"))
    assert target_t["images"].shape[0] == len(target_meta["uids"]) == cfg.target_size
    assert ref_t["images"].shape[0] == len(ref_meta["uids"]) == cfg.reference_size

    pool = load_pool(cfg)  # the same seeded split the run used
    train_uids = {s.uid for s in pool.train}
    assert len(pool.train) == rec["n_train"]
    assert target_meta["uids"] == [s.uid for s in pool.target]
    assert not set(target_meta["uids"]) & train_uids
    assert set(ref_meta["uids"]) <= train_uids
    gb, gb_meta = load_tensors(run.set_file("grad_batches"))
    assert gb["images"].shape[:2] == (cfg.grad_batches, cfg.batch_size)
    assert gb_meta["k"] == cfg.grad_batches


def test_unusable_pool_rows_and_damaged_shards_are_said_and_recorded(
    tiny_run, tiny_pool, tmp_path, caplog
):
    """Review: `diffin train` over a pool with error rows and damaged shards logged only how
    many pairs it trained on; a pool of damaged shards gave "0 decodable pairs" alone."""
    first = tiny_pool["train_data"].split("{")[0] + "00000.tar"
    cut = Path(first).read_bytes()
    (tmp_path / "cut.tar").write_bytes(cut[: len(cut) // 2])
    (tmp_path / "html.tar").write_bytes(b"<html>404</html>" * 64)
    cfg = dataclasses.replace(
        tiny_run["config"],
        data=f"{tiny_pool['train_data']}::{tmp_path}/cut.tar::{tmp_path}/html.tar",
    )
    with caplog.at_level("WARNING", logger="pipeline.train.sets"):
        pool = load_pool(cfg)
    counts = pool.counts()
    assert set(counts["shards_damaged"]) == {f"{tmp_path}/cut.tar", f"{tmp_path}/html.tar"}
    assert "not a tar file" in counts["shards_damaged"][f"{tmp_path}/html.tar"]
    assert sum(counts["error_reasons"].values()) + 2 == counts["errors"]
    assert "2 shard(s) not read to the end" in caplog.text
    bad = dataclasses.replace(cfg, data=f"{tmp_path}/html.tar")
    with pytest.raises(ConfigError, match=r"0 decodable pairs of 0 samples read.*not a tar file"):
        load_pool(bad)


def test_same_seed_gives_byte_identical_checkpoints(tiny_run, tmp_path):
    cfg = dataclasses.replace(tiny_run["config"], run=str(tmp_path / "again"))
    rec = train(cfg)
    first = _traj(tiny_run["run"])["checkpoints"]
    assert [c["sha256"] for c in rec["checkpoints"]] == [c["sha256"] for c in first]
    for c in first:
        a = Path(RunDir(tiny_run["run"]).checkpoint(c["step"])).read_bytes()
        b = Path(RunDir(cfg.run).checkpoint(c["step"])).read_bytes()
        assert a == b
    for name in ("reference", "target", "grad_batches"):
        a = Path(RunDir(tiny_run["run"]).set_file(name)).read_bytes()
        b = Path(RunDir(cfg.run).set_file(name)).read_bytes()
        assert a == b, name


@pytest.mark.parametrize(
    "field,value",
    [
        ("steps", 0),
        ("checkpoints", 0),
        ("checkpoints", 11),
        ("spacing", "log"),
        ("batch_size", 1),
        ("optimizer", "lion"),
        ("lr", 0.0),
        ("momentum", 1.0),
        ("weight_decay", -0.1),
        ("warmup", 10),
        ("schedule", "linear"),
        ("target_size", 0),
        ("reference_size", 0),
        ("grad_batches", 0),
        ("workers", -1),
        ("threads", -1),
        ("precision", "fp16"),
        ("resume_every", -1),
        ("max_failures", -1),
    ],
)
def test_validate_names_the_field(field, value, tmp_path):
    cfg = TrainConfig(data="x", run=str(tmp_path / "r"), steps=10, warmup=2, checkpoints=2)
    cfg.validate()
    bad = dataclasses.replace(cfg, **{field: value})
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        bad.validate()


def test_batch_size_must_split_evenly_across_workers(tmp_path):
    cfg = TrainConfig(
        data="x", run=str(tmp_path / "r"), steps=10, warmup=2, checkpoints=2, batch_size=32
    )
    dataclasses.replace(cfg, workers=4).validate()
    with pytest.raises(ConfigError, match=r"^batch_size: must be a multiple of --workers 3"):
        dataclasses.replace(cfg, workers=3).validate()


def test_adamw_records_which_lr_enters_the_weights(tiny_run, tmp_path):
    cfg = dataclasses.replace(
        tiny_run["config"], run=str(tmp_path / "adamw"), optimizer="adamw", lr=2e-3, steps=6,
        warmup=2, checkpoints=2,
    )  # fmt: skip
    rec = train(cfg)
    assert rec["optimizer"]["name"] == "adamw"
    assert "scheduled base rate" in rec["optimizer"]["lr_in_weights"]
    for c in rec["checkpoints"]:  # the schedule's rate, not Adam's per-coordinate step
        assert c["lr"] == lr_at(c["step"], cfg.lr, cfg.warmup, cfg.steps, cfg.schedule)
    assert tiny_run["record"]["optimizer"]["lr_in_weights"] == "the SGD rate of the step"


def test_train_refuses_bad_config_before_any_work(tmp_path):
    run = tmp_path / "r"
    with pytest.raises(ConfigError, match="lr"):
        train(TrainConfig(data=str(tmp_path / "none.tar"), run=str(run), lr=-1))
    with pytest.raises(ConfigError, match="model"):
        train(TrainConfig(data=str(tmp_path / "none.tar"), run=str(run), model="nope"))
    assert not run.exists()


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(lr=float("inf")), "lr"),
        (dict(weight_decay=float("inf")), "weight_decay"),
        (dict(momentum=float("nan")), "momentum"),
        (dict(seed=-7), "seed"),  # random.Random(-7) drew the sets of seed 7
        (dict(seed=2**64), "seed"),
        (dict(max_samples=0), "max_samples"),
        (dict(steps=10.5), "steps"),
        (dict(target_size=2.5), "target_size"),
        (dict(batch_size=64.0), "batch_size"),
        (dict(steps=True), "steps"),
        (dict(resume_every=3.5), "resume_every"),
        (dict(address="auto"), "address"),  # walkthrough: ignored without --workers
    ],
)
def test_config_values_that_failed_only_after_the_pool_was_read_are_refused(
    tmp_path, change, field
):
    """Each of these passed validate() and failed later, some after the run's old
    trajectory.json had been removed (review)."""
    run = tmp_path / "r"
    with pytest.raises(ConfigError, match=f"^{field}: "):
        train(TrainConfig(data=str(tmp_path / "none.tar"), run=str(run), **change))
    assert not run.exists()


def test_pretrained_weights_of_another_architecture_are_refused_before_the_pool(tmp_path):
    """Before: open_clip's bare AssertionError, after the whole pool was read (review)."""
    small = tmp_path / "small.pt"
    torch.save(factory.create("diffin-small").model.state_dict(), small)
    run = tmp_path / "r"
    cfg = TrainConfig(data=str(tmp_path / "none.tar"), run=str(run), pretrained=str(small))
    with pytest.raises(
        ConfigError, match=r"^pretrained: cannot load .*small\.pt.* into 'diffin-tiny'"
    ):
        train(dataclasses.replace(cfg, model="diffin-tiny"))
    assert not run.exists()


def test_more_workers_than_gpus_is_refused_before_ray_train_waits_forever(tmp_path, monkeypatch):
    """Ray Train retries a worker group it cannot place without end (review)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = TrainConfig(data=str(tmp_path / "none.tar"), run=str(tmp_path / "r"), workers=2)
    with pytest.raises(ConfigError, match=r"^workers: 2 Ray Train workers take one GPU each"):
        train(cfg)
    from pipeline.train.distributed import check_placeable

    check_placeable(dataclasses.replace(cfg, workers=1))
    check_placeable(dataclasses.replace(cfg, address="ray://head:10001"))  # may grow
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    check_placeable(cfg)  # CPU workers: the embedded Ray is sized for them


def test_a_rerun_that_dies_leaves_no_record_of_the_run_it_replaces(tiny_run, tmp_path, caplog):
    """Before: the old trajectory.json stayed beside the new run's sets (review)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    assert Path(RunDir(str(run)).trajectory_json).exists()
    diverging = dataclasses.replace(tiny_run["config"], run=str(run), seed=1, lr=1e12)
    with caplog.at_level("WARNING", logger="pipeline.train.trajectory"):
        with pytest.raises(FloatingPointError):
            train(diverging)
    assert not Path(RunDir(str(run)).trajectory_json).exists()
    # the replaced training is said (walkthrough: not a word)
    assert "held a finished training of another config" in caplog.text


# -- the loop on in-memory tensors ----------------------------------------------


N, BS, STEPS = 24, 6, 8


@pytest.fixture
def loop_data():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(N, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 1000, (N, 24), generator=g)
    tokens[:, 0] = torch.arange(N) + 5000  # first token identifies the sample
    return images, tokens


def _run_loop(images, tokens, removed=None, ckpts=None):
    torch.manual_seed(0)
    model = factory.create("diffin-tiny").model
    seen: list[list[int]] = []
    forward = model.forward

    def recording(img, tok):
        seen.append((tok[:, 0] - 5000).tolist())
        return forward(img, tok)

    model.forward = recording
    cfg = TrainConfig(data="x", run="x", steps=STEPS, warmup=2, batch_size=BS, lr=0.05)
    order = batch_order(N, BS, STEPS, seed=0)
    states: dict[int, dict] = {}

    def keep(step, lr, m):
        states[step] = {k: v.detach().clone() for k, v in m.state_dict().items()}

    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    train_loop(model, images, tokens, cfg, order, ckpts, keep, removed=removed, progress=False)
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return order, seen, states, initial, final


def test_batch_order_is_seeded_epochs_of_permutations():
    order = batch_order(N, BS, STEPS, seed=0)
    assert len(order) == STEPS and all(len(b) == BS for b in order)
    per_epoch = N // BS
    first_epoch = torch.cat(order[:per_epoch])
    assert sorted(first_epoch.tolist()) == list(range(N))  # each sample once per epoch
    assert all(torch.equal(a, b) for a, b in zip(order, batch_order(N, BS, STEPS, 0), strict=True))
    assert any(
        not torch.equal(a, b) for a, b in zip(order, batch_order(N, BS, STEPS, 1), strict=True)
    )


def test_removed_drops_exactly_those_samples_and_keeps_other_batches(loop_data):
    images, tokens = loop_data
    removed = torch.zeros(N, dtype=torch.bool)
    removed[[3, 11, 17]] = True
    order, seen_full, *_ = _run_loop(images, tokens)
    _, seen_pruned, *_ = _run_loop(images, tokens, removed=removed)
    assert seen_full == [b.tolist() for b in order]
    assert len(seen_pruned) == STEPS
    gone = set(removed.nonzero().flatten().tolist())
    touched = 0
    for full, pruned in zip(seen_full, seen_pruned, strict=True):
        assert pruned == [i for i in full if i not in gone]  # same order, minus removed
        touched += pruned != full
    assert touched > 0  # the removal did hit some batch
    assert not gone & {i for b in seen_pruned for i in b}


def test_removing_nothing_reproduces_the_full_run_and_removing_something_changes_it(loop_data):
    images, tokens = loop_data
    *_, full = _run_loop(images, tokens)
    *_, none_removed = _run_loop(images, tokens, removed=torch.zeros(N, dtype=torch.bool))
    removed = torch.zeros(N, dtype=torch.bool)
    removed[0] = True
    *_, one_removed = _run_loop(images, tokens, removed=removed)
    assert all(torch.equal(full[k], none_removed[k]) for k in full)
    assert any(not torch.equal(full[k], one_removed[k]) for k in full)


def test_checkpoint_callback_sees_theta_before_the_update(loop_data):
    images, tokens = loop_data
    _, _, states, initial, final = _run_loop(images, tokens, ckpts=[0, 3, STEPS])
    assert sorted(states) == [0, 3, STEPS]
    assert all(torch.equal(states[0][k], initial[k]) for k in initial)
    assert all(torch.equal(states[STEPS][k], final[k]) for k in final)
    assert any(not torch.equal(states[3][k], initial[k]) for k in initial)


def test_a_pool_over_max_samples_is_drawn_holding_at_most_max_samples_images(
    tiny_pool, tiny_run, monkeypatch
):
    """Before: every decoded pair of the pool was held, then max_samples were drawn."""
    import weakref

    import pipeline.train.sets as sets

    cap = 120
    cfg = dataclasses.replace(tiny_run["config"], max_samples=cap)
    alive = {"now": 0, "peak": 0}
    read = sets.iter_shard

    def counted(url, **kwargs):
        for s in read(url, **kwargs):
            if s.ok:
                alive["now"] += 1
                alive["peak"] = max(alive["peak"], alive["now"])
                weakref.finalize(s, lambda: alive.__setitem__("now", alive["now"] - 1))
            yield s

    monkeypatch.setattr(sets, "iter_shard", counted)
    pool = load_pool(cfg)
    assert len(pool.train) + len(pool.target) == cap and pool.read == tiny_pool["samples"]
    assert alive["peak"] <= cap + 2  # the reservoir, plus the pair being read
    drawn = [s.uid for s in pool.train + pool.target]
    assert len(set(drawn)) == cap
    shards = {s.shard for s in pool.train + pool.target}
    assert len(shards) == 3  # drawn from the whole pool, not its first pairs
    again = load_pool(cfg)  # seeded: the same draw
    assert [s.uid for s in again.train + again.target] == drawn
    other = load_pool(dataclasses.replace(cfg, seed=cfg.seed + 1))
    assert {s.uid for s in other.train + other.target} != set(drawn)
    # within the cap the whole pool is kept, as before
    whole = load_pool(tiny_run["config"])
    assert len(whole.train) + len(whole.target) == pool.read - pool.errors
    # With the model's transform the reservoir holds model inputs, not decoded images
    # (review: up to max_samples images at full resolution), and encodes the same.
    from pipeline.model import factory
    from pipeline.model.batches import encode

    bundle = factory.create(cfg.model)
    inputs = load_pool(cfg, bundle.preprocess)
    assert all(torch.is_tensor(s.image) for s in inputs.train + inputs.target)
    assert [s.uid for s in inputs.train] == [s.uid for s in pool.train]
    assert torch.equal(encode(inputs.train, bundle)[0], encode(pool.train, bundle)[0])


def test_a_run_from_a_pretrained_tag_is_scored_with_that_tags_preprocessing(
    tiny_pool, tmp_path, monkeypatch
):
    """Before: training encoded the sets with the tag's transform (its own mean, std,
    resize), scoring rebuilt the model by name and encoded the pool with open_clip's
    defaults, so the pool and the references R went through different transforms."""
    import open_clip

    from pipeline.data.reader import iter_shard
    from pipeline.data.shards import resolve_shards
    from pipeline.model import factory
    from pipeline.score.config import ScoreConfig
    from pipeline.score.worker import ShardScorer
    from pipeline.tensors import load_tensors
    from pipeline.train.config import TrainConfig
    from tests.conftest import TINY_TRAIN

    weights = tmp_path / "tiny.pt"
    torch.save(factory.create("diffin-tiny").model.state_dict(), weights)
    tag = {
        "file": str(weights),  # a local registry entry: nothing is downloaded
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "interpolation": "bilinear",
        "resize_mode": "squash",
    }
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "diffin-tiny", {"localtag": tag})
    run = str(tmp_path / "run")
    cfg = TrainConfig(
        data=tiny_pool["train_data"], run=run, **{**TINY_TRAIN, "steps": 10, "warmup": 2}
    )
    rec = train(dataclasses.replace(cfg, pretrained="localtag"))
    assert rec["starting_weights"] == "localtag"
    # a file is identified by its content, not by the path as typed (walkthrough)
    from_file = train(dataclasses.replace(cfg, run=str(tmp_path / "f"), pretrained=str(weights)))
    assert from_file["starting_weights"] == factory.pretrained_identity(str(weights))
    assert from_file["starting_weights"].startswith("sha256:")
    assert rec["preprocess_cfg"]["mean"] == [0.5] * 3
    assert rec["preprocess_cfg"]["resize_mode"] == "squash"

    score_cfg = ScoreConfig(data=tiny_pool["train_data"], run=run, methods=["loss"], threads=1)
    scorer = ShardScorer(run, score_cfg)
    assert scorer.bundle.preprocess_cfg == rec["preprocess_cfg"]
    ref, meta = load_tensors(RunDir(run).set_file("reference"))
    by_uid = {
        s.uid: s for u in resolve_shards(tiny_pool["train_data"]) for s in iter_shard(u) if s.ok
    }
    first = by_uid[meta["uids"][0]]
    assert torch.equal(scorer.bundle.preprocess(first.image), ref["images"][0])


def test_the_train_bar_counts_trained_steps_from_where_a_resumed_loop_starts(
    loop_data, monkeypatch
):
    """The bar ran over range(start, steps + 1): a finished run said 8/9 steps."""
    import copy
    import io

    import pipeline.train.loop as loop

    bars: list = []
    make_bar = loop.tqdm

    def shown(*args, **kwargs):
        bar = make_bar(*args, **{**kwargs, "disable": False, "file": io.StringIO()})
        bars.append(bar)
        return bar

    monkeypatch.setattr(loop, "tqdm", shown)
    images, tokens = loop_data
    cfg = TrainConfig(data="x", run="x", steps=STEPS, warmup=2, batch_size=BS, lr=0.05)
    order = batch_order(N, BS, STEPS, seed=0)
    saved: dict = {}

    def save(step, opt, losses):
        saved.setdefault(step, (copy.deepcopy(opt.state_dict()), list(losses)))

    torch.manual_seed(0)
    train_loop(factory.create("diffin-tiny").model, images, tokens, cfg, order,
               save_steps={3}, on_save=save)  # fmt: skip
    torch.manual_seed(0)
    state = loop.LoopState(3, *saved[3])
    train_loop(factory.create("diffin-tiny").model, images, tokens, cfg, order, state=state)
    assert [(b.n, b.total) for b in bars] == [(STEPS, STEPS), (STEPS, STEPS)]
    assert "8/8" in bars[0].fp.getvalue() and "3/8" in bars[1].fp.getvalue()


def test_a_pool_larger_than_the_memory_left_is_refused_while_it_is_read(tiny_run, monkeypatch):
    """The reservoir holds up to max_samples pairs as uint8 pixels: at 224 px the default
    100,000 is 15 GB, and training was killed for memory after reading, with no word (review)."""
    import pipeline.train.sets as sets
    from pipeline.model import factory
    from pipeline.model.batches import pool_transform

    bundle = factory.create(tiny_run["config"].model)
    transform = pool_transform(bundle)
    per_pair = 3 * 32 * 32  # diffin-tiny's uint8 pixels, a quarter of its float32 inputs
    monkeypatch.setattr(sets, "available_bytes", lambda: 2 * per_pair * 50)  # room for 50
    read = {"n": 0}
    iter_shard = sets.iter_shard

    def counted(url, **kwargs):
        for s in iter_shard(url, **kwargs):
            read["n"] += 1
            yield s

    monkeypatch.setattr(sets, "iter_shard", counted)
    with pytest.raises(ConfigError, match=r"^max_samples: .* more than 50 pairs of \(3, 32, 32\)"):
        load_pool(tiny_run["config"], transform)
    assert read["n"] <= 60  # refused as the 51st pair came, not after the whole pool
    cfg = dataclasses.replace(tiny_run["config"], max_samples=50, target_size=8, batch_size=8)
    assert len(load_pool(cfg, transform).train) == 42  # within the room: read as before
    # room for fewer pairs than the sets need: no --max-samples would do, and it says so
    monkeypatch.setattr(sets, "available_bytes", lambda: 2 * per_pair * 10)
    with pytest.raises(ConfigError, match=r"fewer than target_size \+ batch_size = 16: free"):
        load_pool(cfg, transform)


def test_a_reference_set_cut_to_the_training_split_is_said(tiny_run, caplog):
    """Walkthrough: a 320-pair pool silently gave 192 references for --reference-size 255."""
    import dataclasses

    cfg = tiny_run["config"]
    n_train = len(load_pool(cfg).train)
    with caplog.at_level("WARNING"):
        pool = load_pool(dataclasses.replace(cfg, reference_size=n_train + 5))
    assert len(pool.reference) == n_train
    assert f"training split has {n_train} pairs, fewer than --reference-size {n_train + 5}" in (
        caplog.text
    )


def test_a_target_holding_out_much_of_a_small_pool_is_said(tiny_run, caplog):
    """Walkthrough: the default --target-size 128 held out 55% of a 230-pair pool, and only
    the reference set's shortfall was said."""
    import dataclasses

    cfg = tiny_run["config"]
    n_ok = len(load_pool(cfg).train) + cfg.target_size
    with caplog.at_level("WARNING", logger="pipeline.train.sets"):
        load_pool(dataclasses.replace(cfg, target_size=n_ok // 4))
        assert "--target-size" not in caplog.text
        load_pool(dataclasses.replace(cfg, target_size=n_ok // 2))
    share = round(100 * (n_ok // 2) / n_ok)
    assert f"--target-size {n_ok // 2} takes {share}% of the {n_ok} decodable pairs read" in (
        caplog.text
    )


def test_a_proxy_that_ends_at_chance_is_said(caplog):
    """Walkthrough: `--lr 1000` (or adamw at 10) blew the weights up without a NaN: the
    loss stayed at ln(batch) and the run exited 0 without a word."""
    import math

    from pipeline.train.trajectory import warn_if_at_chance

    chance = math.log(64)
    with caplog.at_level("WARNING", logger="pipeline.train.trajectory"):
        warn_if_at_chance([(s, chance - 1.5 * s / 400) for s in range(400)], 64)  # learned
        warn_if_at_chance([], 64)
        assert caplog.text == ""
        warn_if_at_chance([(s, chance + 0.002) for s in range(60)], 64)
    assert "at or above the chance level of a batch of 64 (ln 64 = 4.159)" in caplog.text
