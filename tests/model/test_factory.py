"""The model factory: small configs registered with open_clip, weights loaded, configs exported."""

from __future__ import annotations

import json
import logging

import open_clip
import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.model import factory


def test_small_configs_are_registered_with_open_clip():
    names = factory.small_config_names()
    assert {"diffin-tiny", "diffin-small"} <= set(names)
    factory.register_small_configs()
    for name in names:
        cfg = open_clip.get_model_config(name)
        assert cfg is not None, name
        assert cfg == factory.model_config(name)
        on_disk = json.loads((factory.CONFIG_DIR / f"{name}.json").read_text())
        assert cfg["embed_dim"] == on_disk["embed_dim"]


@pytest.mark.parametrize("name", ["diffin-tiny", "diffin-small"])
def test_small_configs_build_and_encode(name):
    torch.manual_seed(0)
    bundle = factory.create(name)
    cfg = factory.model_config(name)
    size = cfg["vision_cfg"]["image_size"]
    assert bundle.name == name
    assert not bundle.model.training  # eval mode: deterministic features
    images = torch.randn(2, 3, size, size)
    tokens = bundle.tokenizer(["a red circle", "a blue square"])
    assert tokens.shape == (2, cfg["text_cfg"]["context_length"])
    with torch.no_grad():
        out = bundle.model(images, tokens)
    assert out["image_features"].shape == (2, cfg["embed_dim"])
    assert out["text_features"].shape == (2, cfg["embed_dim"])
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(2), atol=1e-5)
    params = factory.param_dict(bundle.model)
    assert "logit_scale" in params
    assert all(not p.requires_grad for p in params.values())  # detached copies


def test_create_does_not_leave_root_logger_changed():
    root = logging.getLogger()
    before = root.level
    factory.create("diffin-tiny")
    assert root.level == before


def test_create_honours_dtype():
    bundle = factory.create("diffin-tiny", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in bundle.model.parameters())


def test_unknown_model_is_a_config_error():
    with pytest.raises(ConfigError, match="model"):
        factory.create("no-such-model-xyz")
    with pytest.raises(ConfigError, match="model"):
        factory.model_config("no-such-model-xyz")


def test_pretrained_checkpoint_file_loads_those_weights(tmp_path):
    torch.manual_seed(123)
    src = factory.create("diffin-tiny").model
    with torch.no_grad():
        src.logit_scale.fill_(1.2345)  # something random init would never produce
    path = tmp_path / "weights.pt"
    torch.save(src.state_dict(), path)

    torch.manual_seed(999)  # a different random init before loading
    loaded = factory.create("diffin-tiny", pretrained=str(path)).model
    want, got = src.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_random_init_differs_without_pretrained():
    """Guards the test above: two seeds do give different weights."""
    torch.manual_seed(123)
    a = factory.create("diffin-tiny").model.state_dict()
    torch.manual_seed(999)
    b = factory.create("diffin-tiny").model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bogus", ["definitely-not-a-tag", "/nonexistent/weights.pt"])
def test_bogus_pretrained_is_a_config_error(bogus):
    with pytest.raises(ConfigError, match="pretrained"):
        factory.create("diffin-tiny", pretrained=bogus)


def test_save_config_dir_is_usable_by_open_clip_local_dir(tmp_path):
    out = factory.save_config_dir("diffin-tiny", tmp_path / "cfg")
    data = json.loads((out / "open_clip_config.json").read_text())
    assert data["model_cfg"] == factory.model_config("diffin-tiny")

    model = open_clip.create_model(f"local-dir:{out}")
    ref = factory.create("diffin-tiny").model
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    tok = open_clip.get_tokenizer(f"local-dir:{out}")
    assert tok(["x"]).shape[-1] == data["model_cfg"]["text_cfg"]["context_length"]


def test_save_config_dir_refuses_unknown_model(tmp_path):
    with pytest.raises(ConfigError, match="model"):
        factory.save_config_dir("no-such-model-xyz", tmp_path / "cfg")
    assert not (tmp_path / "cfg" / "open_clip_config.json").exists()


def test_create_records_and_reapplies_its_preprocessing():
    default = factory.create("diffin-tiny")
    assert default.preprocess_cfg["mean"] == list(open_clip.OPENAI_DATASET_MEAN)
    json.dumps(default.preprocess_cfg)  # recorded in trajectory.json as it is
    want = {
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "interpolation": "bilinear",
        "resize_mode": "squash",
    }
    forced = factory.create("diffin-tiny", preprocess_cfg={**default.preprocess_cfg, **want})
    assert {k: forced.preprocess_cfg[k] for k in want} == want
    from PIL import Image

    image = Image.new("RGB", (40, 20), (200, 30, 60))
    assert forced.preprocess(image).shape == default.preprocess(image).shape
    assert not torch.equal(forced.preprocess(image), default.preprocess(image))
    again = factory.create("diffin-tiny", preprocess_cfg=forced.preprocess_cfg)
    assert torch.equal(again.preprocess(image), forced.preprocess(image))


def test_pretrained_files_named_like_run_paths_and_damaged_files(tmp_path, monkeypatch):
    """From review: ~ and file:// were refused; an empty or damaged file raised a raw
    EOFError/SafetensorError; a local-dir: model silently ignored its --pretrained."""
    from safetensors.torch import save_file

    src = factory.create("diffin-tiny").model
    monkeypatch.setenv("HOME", str(tmp_path))
    torch.save(src.state_dict(), tmp_path / "w.pt")
    for name in ("~/w.pt", f"file://{tmp_path}/w.pt"):
        got = factory.create("diffin-tiny", pretrained=name).model.state_dict()
        assert all(torch.equal(v, got[k]) for k, v in src.state_dict().items()), name
    (tmp_path / "empty.pt").write_bytes(b"")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "w.safetensors")
    cut = (tmp_path / "w.safetensors").read_bytes()[:5]
    (tmp_path / "cut.safetensors").write_bytes(cut)
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")  # walkthrough: "KeyError: 101"
    for bad in ("empty.pt", "cut.safetensors", "notes.pt"):
        with pytest.raises(ConfigError, match=f"pretrained: cannot load .*{bad}.*expected an"):
            factory.create("diffin-tiny", pretrained=str(tmp_path / bad))
    cfg_dir = factory.save_config_dir("diffin-tiny", tmp_path / "cfg")
    with pytest.raises(ConfigError, match="not used with hf-hub: or local-dir:"):
        factory.create(f"local-dir:{cfg_dir}", pretrained=str(tmp_path / "w.pt"))


def test_pretrained_tags_are_matched_as_open_clip_matches_them(monkeypatch, tmp_path):
    torch.save(factory.create("diffin-tiny").model.state_dict(), tmp_path / "w.pt")
    entry = {"my_tag": {"file": str(tmp_path / "w.pt")}}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "diffin-tiny", entry)
    factory.create("diffin-tiny", pretrained="My-Tag")  # open_clip's spelling rules


def test_runs_recorded_before_preprocess_cfg_fall_back_to_their_tag(monkeypatch):
    entry = {"localtag": {"file": "w.pt", "mean": (0.5,) * 3, "resize_mode": "squash"}}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "diffin-tiny", entry)
    old = {"model": "diffin-tiny", "pretrained": "localtag"}
    assert factory.recorded_preprocess(old) == {"mean": [0.5] * 3, "resize_mode": "squash"}
    assert factory.recorded_preprocess({**old, "pretrained": "/x/w.pt"}) is None
    assert factory.recorded_preprocess({**old, "pretrained": None}) is None
    new = {**old, "preprocess_cfg": {"mean": [0.1] * 3}}
    assert factory.recorded_preprocess(new) == {"mean": [0.1] * 3}


def test_the_starting_weights_of_a_local_dir_model_are_its_files(tmp_path):
    """Review: a local-dir: model loads its weights from DIR with no --pretrained, and only
    its name was fingerprinted: weights replaced in DIR resumed a training as if the same."""
    folder = factory.save_config_dir("diffin-tiny", tmp_path / "m")
    name = f"local-dir:{folder}"
    first = factory.starting_weights(name, None)
    assert first is not None and first == factory.starting_weights(name, None)
    (folder / "open_clip_pytorch_model.bin").write_bytes(b"weights one")
    with_weights = factory.starting_weights(name, None)
    (folder / "open_clip_pytorch_model.bin").write_bytes(b"weights two")
    assert len({first, with_weights, factory.starting_weights(name, None)}) == 3
    assert factory.starting_weights("diffin-tiny", None) is None
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"x")
    assert factory.starting_weights("diffin-tiny", str(ckpt)) == factory.pretrained_identity(
        str(ckpt)
    )


@pytest.mark.parametrize(
    "device, dtype, tf32_off, deterministic",
    [
        ("cuda", torch.float32, True, True),
        ("cuda", torch.bfloat16, False, True),
        ("cpu", torch.float32, False, False),
    ],
)
def test_exact_float32_sets_the_gpu_flags_float32_needs(device, dtype, tf32_off, deterministic):
    # The flags are plain process settings: they can be checked without a GPU.
    # (torch's cuBLAS flag module defeats monkeypatch: saved and restored by hand.)
    from pipeline.model.factory import exact_float32

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.allow_tf32, cudnn.deterministic, matmul.allow_tf32)
    try:
        cudnn.allow_tf32, cudnn.deterministic, matmul.allow_tf32 = True, False, True
        exact_float32(torch.device(device), dtype)
        assert cudnn.allow_tf32 is not tf32_off
        assert matmul.allow_tf32 is not tf32_off
        assert cudnn.deterministic is deterministic
    finally:
        cudnn.allow_tf32, cudnn.deterministic, matmul.allow_tf32 = saved


def _saved(tmp_path, name: str, obj) -> str:
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


def test_checkpoints_of_another_image_size_or_context_length_are_refused(tmp_path):
    """Walkthrough: open_clip resized the position embeddings of such a checkpoint to fit
    --model, without a word, and trained another model than the file's."""
    factory.register_small_configs()
    for force in ({"force_image_size": 64}, {"force_context_length": 77}):
        other = open_clip.create_model("diffin-tiny", **force)
        path = _saved(tmp_path, "other.pt", {"epoch": 1, "state_dict": other.state_dict()})
        with pytest.raises(ConfigError, match=r"positional_embedding is \(.*\) in the file"):
            factory.create("diffin-tiny", pretrained=path)


def test_weights_that_do_not_fit_are_named_and_odd_files_refused(tmp_path):
    """Walkthrough: torch's key list was cut off after its first line, and an empty dict,
    a list or an empty state_dict raised StopIteration or AttributeError tracebacks."""
    good = factory.create("diffin-tiny").model.state_dict()
    missing = _saved(tmp_path, "missing.pt", {k: v for k, v in good.items() if k != "logit_scale"})
    extra = _saved(tmp_path, "extra.pt", {**good, "head.extra": torch.zeros(2)})
    nan = _saved(tmp_path, "nan.pt", {**good, "logit_scale": torch.tensor(float("nan"))})
    cases = {
        missing: r"missing: logit_scale",
        extra: r"not in the model: head\.extra",
        nan: r"NaN or infinite values in logit_scale$",  # no architecture hint
        _saved(tmp_path, "empty.pt", {}): "holds no state dict",
        _saved(tmp_path, "empty_sd.pt", {"state_dict": {}}): "holds no state dict",
        _saved(tmp_path, "list.pt", [1, 2, 3]): "holds no state dict",
        _saved(tmp_path, "ints.pt", {"a": 1}): "not named tensors, e.g. 'a'",
    }
    for path, want in cases.items():
        with pytest.raises(ConfigError, match=f"^pretrained: cannot load .*: .*{want}"):
            factory.create("diffin-tiny", pretrained=path)
    # what open_clip_train writes under DDP loads exactly
    ddp = {"epoch": 2, "state_dict": {f"module.{k}": v for k, v in good.items()}}
    got = factory.create("diffin-tiny", pretrained=_saved(tmp_path, "ddp.pt", ddp)).model
    assert all(torch.equal(v, got.state_dict()[k]) for k, v in good.items())


def test_local_dir_models_gone_or_with_unfit_weights_are_configuration_errors(tmp_path):
    """Walkthrough: a missing folder raised FileNotFoundError, weights of another
    architecture in it an AssertionError, each with a traceback."""
    with pytest.raises(ConfigError, match="^model: 'local-dir:.*gone'"):
        factory.create(f"local-dir:{tmp_path / 'gone'}")
    folder = factory.save_config_dir("diffin-small", tmp_path / "m")
    torch.save(factory.create("diffin-tiny").model.state_dict(), folder / "open_clip_model.bin")
    with pytest.raises(ConfigError, match=r"^model: cannot load .*open_clip_model\.bin"):
        factory.create(f"local-dir:{folder}", folder_weights=True)
    # the stages that load a run's checkpoints build the architecture alone (review: an
    # import of a run whose checkpoints fit was refused for the folder's starting file)
    factory.create(f"local-dir:{folder}")
    small = factory.create("diffin-small").model.state_dict()
    torch.save(small, folder / "open_clip_model.bin")
    got = factory.create(f"local-dir:{folder}", folder_weights=True).model.state_dict()
    assert all(torch.equal(v, got[k]) for k, v in small.items())


def test_a_tag_that_cannot_be_downloaded_says_so(monkeypatch):
    """Walkthrough: a failed download was reported as a file of the wrong architecture,
    cut at 300 characters, after a minute of retries: HF_HUB_OFFLINE=1 is named."""
    entry = {"unreachable": {"url": "http://127.0.0.1:9/weights.pt"}}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "diffin-tiny", entry)
    with pytest.raises(ConfigError, match="cannot get open_clip's 'unreachable'") as info:
        factory.create("diffin-tiny", pretrained="unreachable")
    assert "HF_HUB_OFFLINE=1" in str(info.value)
    assert "of this architecture" not in str(info.value)


def test_a_batch_norm_step_counter_may_be_missing():
    """torch's strict load accepts a BatchNorm without num_batches_tracked (RN models):
    the exact check must too (review)."""
    from torch import nn

    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    state = {k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    assert factory.state_dict_mismatch(model, state) is None
    assert "missing: 0.bias" in factory.state_dict_mismatch(
        model, {k: v for k, v in state.items() if k != "0.bias"}
    )
