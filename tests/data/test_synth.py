"""The generated pool: img2dataset layout, exact defect counts, hidden truth, determinism."""

from __future__ import annotations

import io
import json
import re
import tarfile
import uuid
from dataclasses import replace
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data.shards import expand_pattern
from pipeline.data.synth import COLOURS, SHAPES, SynthConfig, make_pool
from pipeline.errors import ConfigError

CFG = SynthConfig(
    samples=70,
    shard_size=16,
    noise=0.2,
    duplicates=0.1,
    junk=0.1,
    eval_samples=20,
    target_samples=12,
    image_size=32,
    seed=3,
)
HEX32 = re.compile(r"^[0-9a-f]{32}$")
JSON_KEYS = {
    "uid",
    "key",
    "caption",
    "status",
    "width",
    "height",
    "original_width",
    "original_height",
}


def _read_tar(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) in tar order, grouped the way WebDataset groups them."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = tf.extractfile(m).read()
    return samples


def _read_split(root: Path) -> list[tuple[str, str, dict[str, bytes]]]:
    """(shard, key, members) for every sample of the shards listed in sizes.json."""
    sizes = json.loads((root / "sizes.json").read_text())
    out = []
    for shard in sizes:
        out.extend((shard, k, m) for k, m in _read_tar(root / shard))
    return out


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pool")
    return out, make_pool(str(out), CFG)


def test_counts_per_shard_match_sizes_json(pool: tuple[Path, dict]) -> None:
    out, summary = pool
    sizes = json.loads((out / "sizes.json").read_text())
    assert list(sizes) == [f"{i:05d}.tar" for i in range(5)]  # ceil(70 / 16)
    assert list(sizes.values()) == [16, 16, 16, 16, 6]
    for shard, n in sizes.items():
        keys = [k for k, _ in _read_tar(out / shard)]
        assert len(keys) == n
        meta = pq.read_table(out / shard.replace(".tar", ".parquet")).to_pylist()
        assert [r["key"] for r in meta] == keys
        assert {r["status"] for r in meta} == {"success"}
    assert summary["sizes"] == sizes and summary["samples"] == 70
    assert summary["train_data"] == f"{out}/{{00000..00004}}.tar"


def test_every_sample_is_complete(pool: tuple[Path, dict]) -> None:
    out, _ = pool
    for shard, key, members in _read_split(out):
        assert list(members) == ["jpg", "txt", "json"]
        # img2dataset's key: 5-digit shard index + 4-digit index within the shard.
        assert re.fullmatch(r"\d{9}", key) and key[:5] == shard[:5]
        meta = json.loads(members["json"])
        assert set(meta) == JSON_KEYS  # no truth (defect, true caption...) leaks in
        assert HEX32.match(meta["uid"])
        assert meta["key"] == key and meta["status"] == "success"
        assert meta["caption"] == members["txt"].decode("utf-8")
        assert (meta["width"], meta["height"]) == (32, 32)
        with Image.open(io.BytesIO(members["jpg"])) as im:
            assert im.format == "JPEG" and im.size == (32, 32) and im.mode == "RGB"


def test_uids_unique_across_pool_eval_and_target(pool: tuple[Path, dict]) -> None:
    out, _ = pool
    uids = [json.loads(m["json"])["uid"] for _, _, m in _read_split(out)]
    uids += [json.loads(m["json"])["uid"] for _, _, m in _read_split(out / "eval")]
    uids += [json.loads(m["json"])["uid"] for _, _, m in _read_split(out / "target")]
    assert len(uids) == 102 and len(set(uids)) == 102


def test_truth_table(pool: tuple[Path, dict]) -> None:
    out, summary = pool
    truth = pq.read_table(out / "truth.parquet").to_pylist()
    samples = _read_split(out)
    assert len(truth) == len(samples) == 70
    for row, (shard, key, members) in zip(truth, samples, strict=True):
        meta = json.loads(members["json"])
        assert (row["uid"], row["key"], row["shard"]) == (meta["uid"], key, shard)
        assert row["caption"] == meta["caption"]
    counts = {d: sum(r["defect"] == d for r in truth) for d in ("mismatch", "duplicate", "noise")}
    assert counts == {
        "mismatch": round(CFG.noise * CFG.samples),
        "duplicate": round(CFG.duplicates * CFG.samples),
        "noise": round(CFG.junk * CFG.samples),
    }
    assert sum(r["defect"] == "clean" for r in truth) == 70 - sum(counts.values())
    assert summary["defects"] == {"clean": 70 - sum(counts.values()), **counts}
    for r in truth:
        if r["defect"] == "clean":
            assert r["caption"] == r["true_caption"]
        if r["defect"] == "mismatch":
            assert r["caption"] != r["true_caption"]
        if r["defect"] == "noise":
            assert r["true_caption"] == "" and r["label"] == "" and r["caption"]
        else:
            assert r["label"] in SHAPES and r["colour"] in COLOURS
            # The true caption names what is drawn.
            assert r["label"] in r["true_caption"] and r["colour"] in r["true_caption"]
        assert (r["duplicate_of"] is not None) == (r["defect"] == "duplicate")
    # The truth lives beside the shards, never inside them.
    for shard in summary["shards"]:
        with tarfile.open(out / shard) as tf:
            assert all(n.rsplit(".", 1)[1] in {"jpg", "txt", "json"} for n in tf.getnames())


def test_duplicates_copy_an_earlier_clean_sample(pool: tuple[Path, dict]) -> None:
    out, _ = pool
    truth = pq.read_table(out / "truth.parquet").to_pylist()
    position = {r["uid"]: i for i, r in enumerate(truth)}
    members = {json.loads(m["json"])["uid"]: m for _, _, m in _read_split(out)}
    dups = [r for r in truth if r["defect"] == "duplicate"]
    assert dups
    for r in dups:
        orig = truth[position[r["duplicate_of"]]]
        assert orig["defect"] == "clean" and position[orig["uid"]] < position[r["uid"]]
        assert r["uid"] != orig["uid"] and r["key"] != orig["key"]
        assert members[r["uid"]]["jpg"] == members[orig["uid"]]["jpg"]
        assert members[r["uid"]]["txt"] == members[orig["uid"]]["txt"]
        assert r["true_caption"] == orig["true_caption"] and r["label"] == orig["label"]


def test_images_differ_except_duplicates(pool: tuple[Path, dict]) -> None:
    out, _ = pool
    truth = pq.read_table(out / "truth.parquet").to_pylist()
    jpgs = [m["jpg"] for _, _, m in _read_split(out)]
    originals = [j for j, r in zip(jpgs, truth, strict=True) if r["defect"] != "duplicate"]
    assert len(set(originals)) == len(originals)


def test_eval_split(pool: tuple[Path, dict]) -> None:
    out, summary = pool
    ev = out / "eval"
    sizes = json.loads((ev / "sizes.json").read_text())
    assert sizes == {"00000.tar": 16, "00001.tar": 4}
    samples = _read_split(ev)
    labels = pq.read_table(ev / "labels.parquet").to_pylist()
    assert {"uid", "key", "label", "colour", "caption"} <= set(labels[0])
    assert len(labels) == len(samples) == 20
    for row, (_, key, members) in zip(labels, samples, strict=True):
        meta = json.loads(members["json"])
        assert set(meta) == JSON_KEYS
        assert (row["uid"], row["key"], row["caption"]) == (meta["uid"], key, meta["caption"])
        assert row["label"] in SHAPES and row["label"] in row["caption"]
        assert row["colour"] in row["caption"]
    classes = json.loads((ev / "classes.json").read_text())
    assert classes["classnames"] == list(SHAPES) and len(SHAPES) >= 5
    assert classes["templates"] and all(t.count("{}") == 1 for t in classes["templates"])
    assert summary["eval"]["samples"] == 20
    assert (ev / "00000.parquet").exists()


def test_target_split_is_clean_and_its_own_stream(pool: tuple[Path, dict], tmp_path: Path) -> None:
    """The curated target: clean pairs (caption = the scene drawn), a pattern `--target` takes."""
    from pipeline.data.shards import resolve_shards

    out, summary = pool
    target = out / "target"
    assert json.loads((target / "sizes.json").read_text()) == {"00000.tar": 12}
    assert summary["target"]["samples"] == 12
    assert resolve_shards(summary["target"]["data"]) == [str(target / "00000.tar")]
    captions = [m["txt"].decode() for _, _, m in _read_split(target)]
    assert len(captions) == 12
    assert all(any(shape in c for shape in SHAPES) for c in captions)
    # its own stream: a bigger pool does not change the target split, eval does not either
    other = make_pool(str(tmp_path / "bigger"), replace(CFG, samples=90))
    assert _tar_bytes(tmp_path / "bigger" / "target") == _tar_bytes(target)
    assert other["target"]["sizes"] == summary["target"]["sizes"]


def test_summary_file(pool: tuple[Path, dict]) -> None:
    out, summary = pool
    stored = json.loads((out / "synth.json").read_text())
    assert stored == json.loads(json.dumps(summary))
    assert stored["config"]["seed"] == 3 and stored["config"]["samples"] == 70


def _tar_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.suffix in {".tar", ".parquet"} or p.name == "sizes.json"
    }


def test_deterministic(pool: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = pool
    make_pool(str(tmp_path / "again"), CFG)
    first, second = _tar_bytes(out), _tar_bytes(tmp_path / "again")
    assert first.keys() == second.keys() and len(first) > 10
    assert first == second
    make_pool(str(tmp_path / "other"), replace(CFG, seed=4))
    other = _tar_bytes(tmp_path / "other")
    assert other.keys() == first.keys()
    assert all(other[k] != first[k] for k in first if k.endswith(".tar"))


def test_memory_url() -> None:
    url = f"memory://synth-{uuid.uuid4().hex}/pool"
    cfg = SynthConfig(samples=12, shard_size=5, eval_samples=3, image_size=16, seed=1)
    try:
        summary = make_pool(url, cfg)
        assert summary["shards"] == ["00000.tar", "00001.tar", "00002.tar"]
        fs = fsspec.filesystem("memory")
        with fs.open(f"{url}/eval/classes.json", "rb") as f:
            assert json.loads(f.read())["classnames"] == list(SHAPES)
        with fs.open(f"{url}/truth.parquet", "rb") as f:
            assert pq.read_table(f).num_rows == 12
        # the refusal names the URL as given (walkthrough: s3://B/pool was "B/pool")
        with pytest.raises(ConfigError, match=f"^out: {url} already holds a pool"):
            make_pool(url, replace(cfg, seed=2))
    finally:
        fsspec.filesystem("memory").rm(url.removeprefix("memory://").split("/")[0], recursive=True)


def test_rerun_keeps_existing_pool_and_refuses_others(tmp_path: Path) -> None:
    cfg = SynthConfig(samples=20, shard_size=8, eval_samples=2, image_size=16)
    out = tmp_path / "p"
    first = make_pool(str(out), cfg)
    mtime = (out / "00000.tar").stat().st_mtime_ns
    assert make_pool(str(out), cfg) == json.loads(json.dumps(first))
    assert (out / "00000.tar").stat().st_mtime_ns == mtime  # skipped, not rewritten
    smaller = replace(cfg, samples=9)
    with pytest.raises(ConfigError, match="out"):
        make_pool(str(out), smaller)
    make_pool(str(out), smaller, overwrite=True)
    assert sorted(p.name for p in out.glob("*.tar")) == [
        "00000.tar",
        "00001.tar",
    ]  # stale 00002 gone
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 8, "00001.tar": 1}


def test_a_moved_pool_is_kept_and_points_at_its_new_place(tmp_path: Path) -> None:
    cfg = SynthConfig(samples=20, shard_size=8, eval_samples=4, target_samples=3, image_size=16)
    first = make_pool(str(tmp_path / "a"), cfg)
    (tmp_path / "a").rename(tmp_path / "b")
    moved = make_pool(str(tmp_path / "b"), cfg)
    new = str(tmp_path / "b")
    assert moved["out"] == new
    for pattern in (moved["train_data"], moved["eval"]["val_data"], moved["target"]["data"]):
        assert pattern.startswith(new + "/")
        assert expand_pattern(pattern) and all(Path(p).exists() for p in expand_pattern(pattern))
    assert moved["sizes"] == first["sizes"] and moved["config"] == first["config"]


def test_refuses_foreign_shards(tmp_path: Path) -> None:
    (tmp_path / "00000.tar").write_bytes(b"")
    with pytest.raises(ConfigError, match="out"):
        make_pool(str(tmp_path), SynthConfig(samples=4, eval_samples=0, image_size=16))
    assert (tmp_path / "00000.tar").read_bytes() == b""


def test_no_eval_samples(tmp_path: Path) -> None:
    summary = make_pool(str(tmp_path), SynthConfig(samples=5, eval_samples=0, image_size=16))
    assert json.loads((tmp_path / "eval" / "sizes.json").read_text()) == {}
    assert pq.read_table(tmp_path / "eval" / "labels.parquet").num_rows == 0
    assert summary["eval"]["val_data"] is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("samples", 0),
        ("shard_size", 0),
        ("shard_size", 10_001),
        ("noise", -0.1),
        ("noise", 1.0),
        ("duplicates", 1.5),
        ("junk", -1e-9),
        ("eval_samples", -1),
        ("target_samples", -1),
        ("image_size", 15),
        ("seed", -1),
        ("samples", 2.5),
    ],
)
def test_bad_config_names_the_field(field: str, value: object, tmp_path: Path) -> None:
    cfg = replace(SynthConfig(), **{field: value})
    with pytest.raises(ConfigError, match=field):
        cfg.validate()
    with pytest.raises(ConfigError, match=field):
        make_pool(str(tmp_path / "never"), cfg)
    assert not (tmp_path / "never").exists()  # refused before any work


def test_rates_must_leave_clean_samples() -> None:
    with pytest.raises(ConfigError, match=re.escape("noise+duplicates+junk")):
        SynthConfig(noise=0.5, duplicates=0.3, junk=0.2).validate()
    # Each rate is fine and the sum is < 1, but rounding leaves nothing clean.
    with pytest.raises(ConfigError, match=re.escape("noise+duplicates+junk")):
        SynthConfig(samples=2, noise=0.3, duplicates=0.3, junk=0.3).validate()
    SynthConfig().validate()


def test_an_interrupted_pool_is_written_again_whole_and_refused_for_training(
    tmp_path: Path, monkeypatch, capsys, caplog
) -> None:
    """Walkthrough: an interrupted make-data left 24 of 30 shards; its message said "run the
    same command again", which refused them (no synth.json), and `train` took them for
    the pool."""
    import pipeline.data.synth as synth
    from pipeline.cli import main

    flags = ["--samples", "40", "--shard-size", "8", "--eval-samples", "4", "--target-samples", "4"]
    assert main(["make-data", str(tmp_path / "whole"), *flags]) == 0
    out = tmp_path / "p"
    real = synth._write_split

    def interrupted(base, items, c):
        if base.endswith("/eval"):  # the pool's shards are written, eval's not yet
            raise KeyboardInterrupt
        return real(base, items, c)

    monkeypatch.setattr(synth, "_write_split", interrupted)
    assert main(["make-data", str(out), *flags]) == 130
    assert "interrupted; run the same command again to write the pool (it starts over)" in (
        capsys.readouterr().err
    )
    assert len(list(out.glob("*.tar"))) == 5 and not (out / "synth.json").exists()

    for flag, pattern in (("--data", f"{out}/"), ("--target", f"{out}/target/")):
        (out / "target").mkdir(exist_ok=True)
        (out / "target" / "00000.tar").write_bytes((out / "00000.tar").read_bytes())
        argv = ["train", "--data", f"{out}/", "--run", str(tmp_path / "run")]
        if flag == "--target":
            argv = ["score", "--data", f"{tmp_path}/whole/", "--target", pattern, "--run", "r"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{flag}: {out} holds a pool make-data has not finished (interrupted)" in err
    assert not (tmp_path / "run").exists()

    monkeypatch.setattr(synth, "_write_split", real)
    assert main(["make-data", str(out), *flags]) == 0  # no --overwrite: the pool is ours
    assert "holds a pool make-data did not finish; writing it again" in caplog.text
    assert not (out / "synth.writing.json").exists()
    assert _tar_bytes(out) == _tar_bytes(tmp_path / "whole")


def test_a_folder_with_other_files_but_no_shards_keeps_them(tmp_path: Path) -> None:
    out = tmp_path / "p"
    out.mkdir()
    (out / "notes.parquet").write_bytes(b"theirs")
    make_pool(str(out), SynthConfig(samples=12, shard_size=8, eval_samples=2, image_size=16))
    assert (out / "notes.parquet").read_bytes() == b"theirs"
    assert not (out / "synth.writing.json").exists() and (out / "synth.json").exists()


def test_the_unfinished_pool_probe_stays_in_the_pool_and_survives_refused_reads(monkeypatch):
    """Review: credentials that read objects but not list them get 403 for a missing marker
    (a traceback where the pool was accepted before), and a pool at a bucket's root was
    probed in the bucket above it ("s3://synth.writing.json", another bucket)."""
    import pipeline.data.synth as synth

    asked = []

    class Store:
        def exists(self, path):
            asked.append(path)
            raise PermissionError("Forbidden")

    monkeypatch.setattr(synth.fsspec.core, "url_to_fs", lambda url: (Store(), url))
    shards = ["s3://b/00000.tar", "s3://b/00001.tar", "s3://b/p/target/00000.tar"]
    assert synth.unfinished_pool(shards) is None
    assert asked == [
        "s3://b/synth.writing.json",
        "s3://b/p/target/synth.writing.json",
        "s3://b/p/synth.writing.json",
    ]
