"""Directory swaps of the run directory (rundir.replace_dir): whole or recoverable, locally and on object stores."""

from __future__ import annotations

import re
import uuid

import fsspec
import pytest

from pipeline.rundir import replace_dir


def _tree(fs, root: str) -> dict[str, bytes]:
    root = root.rstrip("/")
    return {p[len(root) + 1 :]: fs.cat_file(p) for p in fs.find(root)} if fs.exists(root) else {}


def _write(fs, root: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        fs.pipe_file(f"{root}/{name}", data)


OLD = {"manifest.json": b"old", "shards/00000.tar": b"a", "shards/00001.tar": b"b"}
NEW = {"manifest.json": b"new", "shards/00000.tar": b"c", "uids.npy": b"u"}


@pytest.mark.parametrize("where", ["local", "memory"])
def test_replace_dir_puts_the_new_tree_in_place_of_the_old(tmp_path, where):
    root = str(tmp_path) if where == "local" else f"/t-{uuid.uuid4().hex[:8]}"
    fs = (
        fsspec.filesystem("file", auto_mkdir=True)
        if where == "local"
        else fsspec.filesystem("memory")
    )
    prefix = "" if where == "local" else "memory://"
    _write(fs, f"{root}/old", OLD)
    _write(fs, f"{root}/new", NEW)
    replace_dir(f"{prefix}{root}/new", f"{prefix}{root}/old", last="manifest.json")
    assert _tree(fs, f"{root}/old") == NEW
    assert not fs.exists(f"{root}/new")
    _write(fs, f"{root}/fresh", NEW)
    replace_dir(f"{prefix}{root}/fresh", f"{prefix}{root}/absent")  # nothing there before
    assert _tree(fs, f"{root}/absent") == NEW


def test_a_copy_that_fails_on_an_object_store_loses_neither_version(monkeypatch):
    """No rename on object stores: copy over, manifest last, delete the stale files after."""
    fs = fsspec.filesystem("memory")
    root = f"/t-{uuid.uuid4().hex[:8]}"
    _write(fs, f"{root}/old", OLD)
    _write(fs, f"{root}/new", NEW)
    real = type(fs).cp_file
    calls = []

    def flaky(self, path1, path2, **kwargs):
        calls.append(path2)
        if len(calls) == 2:
            raise ConnectionResetError("reset by peer")
        return real(self, path1, path2, **kwargs)

    monkeypatch.setattr(type(fs), "cp_file", flaky)
    with pytest.raises(ConnectionResetError):
        replace_dir(f"memory://{root}/new", f"memory://{root}/old", last="manifest.json")
    assert _tree(fs, f"{root}/new") == NEW  # the new version is whole where it was built
    assert _tree(fs, f"{root}/old")["manifest.json"] == b"old"  # not yet replaced: copied last
    assert set(_tree(fs, f"{root}/old")) >= set(OLD)  # nothing of the old one deleted yet


def test_a_directory_target_that_is_a_file_is_refused_before_the_work(tmp_path):
    """Walkthrough: `train --run FILE` failed with NotADirectoryError after the pool was read
    and encoded; `make-data FILE` with FileExistsError."""
    from pipeline.data.synth import SynthConfig, make_pool
    from pipeline.errors import ConfigError
    from pipeline.rundir import check_dir_target
    from pipeline.train.config import TrainConfig
    from pipeline.train.trajectory import train

    afile = tmp_path / "afile"
    afile.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"^run: .*afile is a file; run names a directory"):
        train(TrainConfig(data=str(tmp_path / "none.tar"), run=str(afile)))
    with pytest.raises(ConfigError, match=r"^out: .*afile is a file"):
        make_pool(str(afile), SynthConfig(samples=10, eval_samples=0, target_samples=0))
    with pytest.raises(ConfigError, match=r"^run: cannot create .*afile/sub/run"):
        check_dir_target(str(afile / "sub" / "run"), "run")
    check_dir_target(str(tmp_path / "new" / "run"), "run")  # a parent to create is fine


def test_a_writable_run_folder_under_a_closed_parent_is_taken(tmp_path, monkeypatch):
    """Review: a mounted, writable --run whose parent is not writable was refused."""
    import os

    from pipeline.errors import ConfigError
    from pipeline.rundir import check_dir_target

    mount = tmp_path / "mnt" / "run"
    mount.mkdir(parents=True)
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: str(p) == str(mount) and access(p, m))
    check_dir_target(str(mount), "run")
    with pytest.raises(ConfigError, match="is not a writable folder"):
        check_dir_target(str(mount.parent / "other"), "run")


def test_a_pool_and_a_run_do_not_share_a_folder(tmp_path):
    """Walkthrough: `train --run POOL` was accepted, and `make-data --overwrite` in that
    folder then deleted the run's scores.parquet (both write *.parquet)."""
    from pipeline.data.synth import SynthConfig, make_pool
    from pipeline.errors import ConfigError
    from pipeline.train.config import TrainConfig
    from pipeline.train.trajectory import train

    cfg = SynthConfig(samples=20, shard_size=10, eval_samples=0, target_samples=0)
    pool = make_pool(str(tmp_path / "pool"), cfg)
    with pytest.raises(ConfigError, match=r"^run: .*pool holds a pool \(\.tar shards\)"):
        train(TrainConfig(data=pool["train_data"], run=str(tmp_path / "pool")))
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    (run / "scores.parquet").write_bytes(b"the run's table")
    with pytest.raises(ConfigError, match=r"^out: .*run is a run directory"):
        make_pool(str(run), cfg, overwrite=True)
    assert (run / "scores.parquet").read_bytes() == b"the run's table"


class _Store:
    """A bucket store whose bucket answer is ``raises`` (None: the bucket is there)."""

    protocol = ("s3", "s3a")

    def __init__(self, raises=None):
        self.raises = raises
        self.asked = []

    def info(self, path):
        self.asked.append(path)
        if self.raises is not None:
            raise self.raises
        return {"type": "directory"}


@pytest.mark.parametrize(
    "raises, refused",
    [
        (None, None),
        (FileNotFoundError("Not Found"), "the bucket 'b' of s3://b/runs/r does not exist"),
        (
            ValueError("Invalid endpoint: x:1"),
            "s3://b/runs/r cannot be reached (ValueError: Invalid endpoint",
        ),
        (
            OSError("Could not connect"),
            "s3://b/runs/r cannot be reached (OSError: Could not connect)",
        ),
        # credentials that may use objects but not ask about the bucket: not refused
        (PermissionError("Access Denied"), None),
        (OSError("Forbidden: b\nno storage.buckets.get access"), None),
    ],
)
def test_a_bucket_is_asked_for_before_any_work(monkeypatch, raises, refused):
    import pipeline.rundir as rundir
    from pipeline.errors import ConfigError

    store = _Store(raises)
    monkeypatch.setattr(rundir.fsspec.core, "url_to_fs", lambda url: (store, url[5:]))
    if refused is None:
        rundir.check_bucket("s3://b/runs/r", "run")
    else:
        with pytest.raises(ConfigError, match=f"^run: {re.escape(refused)}"):
            rundir.check_bucket("s3://b/runs/r", "run")
    assert store.asked == ["b"]


def test_a_store_names_its_bucket_and_gcs_not_found_is_no_proof(monkeypatch):
    """Review: an S3 access point's ARN holds a slash (s3fs splits it), and gcsfs answers an
    empty bucket it may not describe (objectAdmin) with an empty listing: not found."""
    import s3fs

    import pipeline.rundir as rundir

    class AccessPoint(_Store):
        def split_path(self, path):
            return s3fs.S3FileSystem(anon=True).split_path(path)

    store = AccessPoint()
    arn = "arn:aws:s3:us-east-1:123456789012:accesspoint/myap"
    monkeypatch.setattr(rundir.fsspec.core, "url_to_fs", lambda url: (store, url[5:]))
    rundir.check_bucket(f"s3://{arn}/runs/r1", "run")
    assert store.asked == [arn]

    class Gcs(_Store):
        protocol = ("gs", "gcs")

    gcs = Gcs(FileNotFoundError("b"))
    monkeypatch.setattr(rundir.fsspec.core, "url_to_fs", lambda url: (gcs, url[5:]))
    rundir.check_bucket("gs://b/runs/r1", "run")  # not refused
    assert gcs.asked == ["b"]


def test_local_and_bucketless_stores_are_not_asked(tmp_path):
    from pipeline.rundir import check_bucket

    check_bucket(str(tmp_path / "missing" / "run"), "run")
    check_bucket("memory://x/run", "run")
