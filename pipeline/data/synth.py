"""``diffin make-data``: a small synthetic image-text pool with known defects.

Why synthetic: the pipeline has to be demonstrable end to end on a laptop,
with a tiny CLIP (32x32 input, a few CPU minutes) that can actually learn,
and with ground truth to check the pruning against. So each image is one
large, clearly coloured shape at a coarse position on a plain background, and
its caption says exactly that; a known fraction of the pool is then damaged
the ways web data is damaged (wrong caption, exact duplicate, junk image), and
which sample is which is recorded in ``truth.parquet`` *outside* the shards, so
no scorer can peek at it.

The layout is img2dataset's (``00000.tar`` with ``KEY.jpg``/``KEY.txt``/
``KEY.json``, a sibling ``00000.parquet``, ``sizes.json``), so the same code
paths that read real pools read this one. Everything is drawn from a seeded
generator: the same config gives byte-identical shards.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pipeline.data.tarwriter import ShardWriter, brace_pattern
from pipeline.errors import ConfigError
from pipeline.rundir import check_apart, check_dir_target

log = logging.getLogger(__name__)

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "DEFECTS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "TEMPLATES",
    "ZERO_SHOT_TEMPLATES",
    "Scene",
    "SynthConfig",
    "make_pool",
    "render_scene",
]

# -- the visual vocabulary ---------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 225),
    "yellow": (240, 220, 30),
    "purple": (145, 50, 185),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
    "white": (238, 238, 238),
    "brown": (115, 75, 45),
    "teal": (0, 125, 125),
}

# Object radius as a fraction of the image side. Even "small" spans about a
# third of the image, i.e. ~11 px after the 32 px downscale the tiny CLIP sees.
SIZES: dict[str, float] = {"small": 0.18, "large": 0.30}

# Object centre (x, y) as fractions of the image side, and the caption phrase.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.30, 0.50),
    "right": (0.70, 0.50),
    "top": (0.50, 0.30),
    "bottom": (0.50, 0.70),
    "center": (0.50, 0.50),
}
_POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}

# Caption templates; ``{a}`` is the article of the word after it.
TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {shape} {pos}, on a {bg} background",
    "a photo of a {size} {colour} {shape} {pos}",
    "{a} {colour} {shape} {pos} against a {bg} background",
    "there is a {size} {colour} {shape} {pos}",
    "a {size} {shape} in {colour}, {pos}, on {bg}",
)

# Prompts for zero-shot classification by shape (open_clip formats them with
# the class name); worded like the training captions so a tiny model can match.
ZERO_SHOT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a {} on a background.",
    "a small {}.",
    "a large {}.",
    "there is a {} in the center.",
)

DEFECTS: tuple[str, ...] = ("clean", "mismatch", "duplicate", "noise")

_JITTER = 0.05  # max random shift of the object centre, fraction of the side
_MARGIN = 0.02  # the object stays this far inside the image
_PIXEL_NOISE = 6.0  # std of the Gaussian pixel noise, in 0..255 units
_COLOUR_JITTER = 10  # max shift of each RGB channel of object and background
_JPEG_QUALITY = 90
_KEY_SHARD_DIGITS = 5  # img2dataset key: 5-digit shard index + 4-digit index in shard
_KEY_INDEX_DIGITS = 4
_SUMMARY_NAME = "synth.json"
# Written before the first shard, removed after synth.json: a pool that holds it is one
# make-data has not finished (interrupted), which a training must not take for whole.
_WRITING_NAME = "synth.writing.json"


# -- configuration -------------------------------------------------------------


@dataclass
class SynthConfig:
    """Everything that determines the generated pool; stored in ``synth.json``.

    ``noise`` is the rate of *caption* noise (a caption describing another
    scene, the dominant defect of web data), ``duplicates`` the rate of exact
    copies of earlier samples and ``junk`` the rate of images of random pixels.
    Exactly ``round(rate * samples)`` samples get each defect.
    """

    samples: int = 2000
    shard_size: int = 256
    noise: float = 0.2
    duplicates: float = 0.02
    junk: float = 0.02
    eval_samples: int = 500
    # A small curated target set (clean pairs, own stream, disjoint from pool and
    # eval): what a user's own `--target` is in a real run. Influence toward a
    # held-out sample of the noisy pool asks to fit its noise too (docs/accuracy.md).
    target_samples: int = 256
    image_size: int = 64
    seed: int = 0

    def defect_counts(self) -> dict[str, int]:
        """How many pool samples get each defect (``clean`` is the rest)."""
        counts = {
            "mismatch": round(self.noise * self.samples),
            "duplicate": round(self.duplicates * self.samples),
            "noise": round(self.junk * self.samples),
        }
        return {"clean": self.samples - sum(counts.values()), **counts}

    def validate(self) -> None:
        """Refuse a bad config before any file is written, naming the field."""
        for name in (
            "samples",
            "shard_size",
            "eval_samples",
            "target_samples",
            "image_size",
            "seed",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{name}: must be an integer, got {value!r}")
        for name in ("noise", "duplicates", "junk"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ConfigError(f"{name}: must be a number, got {value!r}")
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name}: must be in [0, 1), got {value!r}")
        if self.samples < 1:
            raise ConfigError(f"samples: must be >= 1, got {self.samples}")
        if self.shard_size < 1:
            raise ConfigError(f"shard_size: must be >= 1, got {self.shard_size}")
        if self.shard_size > 10**_KEY_INDEX_DIGITS:
            raise ConfigError(
                f"shard_size: at most {10**_KEY_INDEX_DIGITS} (the key has "
                f"{_KEY_INDEX_DIGITS} digits for the index in a shard), got {self.shard_size}"
            )
        for name in ("samples", "eval_samples", "target_samples"):
            n = getattr(self, name)
            if math.ceil(n / self.shard_size) > 10**_KEY_SHARD_DIGITS:
                raise ConfigError(f"{name}: too many shards for 5-digit shard names ({n})")
        for name in ("eval_samples", "target_samples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.image_size < 16:
            raise ConfigError(f"image_size: must be >= 16, got {self.image_size}")
        if self.seed < 0:
            raise ConfigError(f"seed: must be >= 0, got {self.seed}")
        if self.noise + self.duplicates + self.junk >= 1.0:
            raise ConfigError(
                "noise+duplicates+junk: must sum to less than 1, got "
                f"{self.noise + self.duplicates + self.junk:g}"
            )
        if self.defect_counts()["clean"] < 1:
            raise ConfigError(
                "noise+duplicates+junk: after rounding no clean sample is left "
                f"among {self.samples} samples"
            )


# -- scenes ------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    """One drawable scene: what the true caption says, plus its random jitter."""

    shape: str
    colour: str
    size: str
    position: str
    background: str
    template: int
    dx: float = 0.0  # centre shift, fraction of the image side
    dy: float = 0.0

    def caption(self) -> str:
        """The true caption: compositional, from one of the templates."""
        colour = self.colour
        return TEMPLATES[self.template].format(
            a=_article(colour),
            size=self.size,
            colour=colour,
            shape=self.shape,
            pos=_POSITION_PHRASE[self.position],
            bg=self.background,
        )


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _random_scene(rng: np.random.Generator) -> Scene:
    shape = SHAPES[rng.integers(len(SHAPES))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    colours = [c for c in COLOURS if c != background]
    colour = colours[rng.integers(len(colours))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    template = int(rng.integers(len(TEMPLATES)))
    dx, dy = (float(v) for v in rng.uniform(-_JITTER, _JITTER, size=2))
    return Scene(shape, colour, size, position, background, template, dx, dy)


def _shifted(rgb: tuple[int, int, int], shift: np.ndarray) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in np.clip(np.asarray(rgb) + shift, 0, 255))
    return r, g, b


def _shape_outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon of a shape centred at (cx, cy) fitting in a circle of radius r."""
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.45 * r
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape == "cross":
        t = 0.33 * r
        return [
            (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
            (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
            (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    raise ValueError(f"no outline for shape {shape!r}")


def render_scene(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw a scene directly at ``size`` px, with slight colour and pixel noise.

    The noise keeps two samples of the same scene from being identical images
    (only the injected duplicates are), without hiding the object.
    """
    shifts = rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=6)
    img = Image.new("RGB", (size, size), _shifted(BACKGROUNDS[scene.background], shifts[:3]))
    draw = ImageDraw.Draw(img)
    fill = _shifted(COLOURS[scene.colour], shifts[3:])
    rf = SIZES[scene.size]
    px, py = POSITIONS[scene.position]
    lo, hi = _MARGIN + rf, 1.0 - _MARGIN - rf
    cx = min(max(px + scene.dx, lo), hi) * size
    cy = min(max(py + scene.dy, lo), hi) * size
    r = rf * size
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_shape_outline(scene.shape, cx, cy, r), fill=fill)
    ox, oy = (int(v) for v in rng.integers(size, size=2))
    pixels = np.asarray(img, dtype=np.int16) + _noise_bank(size)[oy : oy + size, ox : ox + size]
    np.clip(pixels, 0, 255, out=pixels)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


@functools.cache
def _noise_bank(size: int) -> np.ndarray:
    """Gaussian pixel noise twice the image side; each image takes a random crop.

    Drawing fresh noise per image dominated the generation time; a crop at a
    random offset gives size**2 different patterns, plenty to make images of
    the same scene differ, and it is just as deterministic.
    """
    rng = np.random.default_rng(20240229)
    noise = rng.normal(0.0, _PIXEL_NOISE, size=(2 * size, 2 * size, 3))
    return np.rint(noise).astype(np.int16)


def _random_pixels(size: int, rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8), "RGB")


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=_JPEG_QUALITY)
    return buf.getvalue()


def _uid(seed: int, split: str, index: int) -> str:
    # img2dataset/DataComp uids are 32 hex digits of a hash; ours hash the
    # sample's identity, so they are stable, unique and differ across seeds.
    return hashlib.sha256(f"diffin-synth/{seed}/{split}/{index}".encode()).hexdigest()[:32]


def _key(index: int, shard_size: int) -> str:
    shard, within = divmod(index, shard_size)
    return f"{shard:0{_KEY_SHARD_DIGITS}d}{within:0{_KEY_INDEX_DIGITS}d}"


# -- the pool ---------------------------------------------------------------


@dataclass
class _Item:
    """One sample as generated: what goes in the tar and what goes in the truth."""

    uid: str
    key: str
    jpg: bytes
    caption: str
    defect: str
    scene: Scene | None  # the scene actually drawn; None for noise images
    duplicate_of: str | None = None


def _defect_plan(cfg: SynthConfig, rng: np.random.Generator) -> list[str]:
    counts = cfg.defect_counts()
    plan = np.array([d for d in DEFECTS for _ in range(counts[d])], dtype=object)
    plan = list(plan[rng.permutation(len(plan))])
    # A duplicate copies an *earlier* clean sample, so the first must be clean.
    if plan[0] != "clean":
        j = plan.index("clean")
        plan[0], plan[j] = plan[j], plan[0]
    return [str(d) for d in plan]


def _different_scene(scene: Scene, rng: np.random.Generator) -> Scene:
    """A random scene that disagrees with ``scene`` on shape or colour.

    Only the object's identity counts: a caption that differs just in wording
    or position would still largely describe the image.
    """
    while True:
        other = _random_scene(rng)
        if other.shape != scene.shape or other.colour != scene.colour:
            return other


def _generate_pool(cfg: SynthConfig) -> list[_Item]:
    plan = _defect_plan(cfg, np.random.default_rng([cfg.seed, 1]))
    rng = np.random.default_rng([cfg.seed, 0])
    items: list[_Item] = []
    clean: list[_Item] = []
    for i, defect in enumerate(plan):
        uid, key = _uid(cfg.seed, "pool", i), _key(i, cfg.shard_size)
        if defect == "duplicate":
            orig = clean[int(rng.integers(len(clean)))]
            item = _Item(uid, key, orig.jpg, orig.caption, defect, orig.scene, orig.uid)
        elif defect == "noise":
            jpg = _jpeg(_random_pixels(cfg.image_size, rng))
            item = _Item(uid, key, jpg, _random_scene(rng).caption(), defect, None)
        else:
            scene = _random_scene(rng)
            jpg = _jpeg(render_scene(scene, cfg.image_size, rng))
            caption = scene.caption()
            if defect == "mismatch":
                caption = _different_scene(scene, rng).caption()
            item = _Item(uid, key, jpg, caption, defect, scene)
            if defect == "clean":
                clean.append(item)
        items.append(item)
    return items


def _generate_clean(cfg: SynthConfig, split: str, n: int, stream: int) -> list[_Item]:
    # Each split has its own stream: changing the pool size changes neither.
    rng = np.random.default_rng([cfg.seed, stream])
    items = []
    for i in range(n):
        scene = _random_scene(rng)
        jpg = _jpeg(render_scene(scene, cfg.image_size, rng))
        uid, key = _uid(cfg.seed, split, i), _key(i, cfg.shard_size)
        items.append(_Item(uid, key, jpg, scene.caption(), "clean", scene))
    return items


def _generate_eval(cfg: SynthConfig) -> list[_Item]:
    return _generate_clean(cfg, "eval", cfg.eval_samples, 2)


def _generate_target(cfg: SynthConfig) -> list[_Item]:
    return _generate_clean(cfg, "target", cfg.target_samples, 3)


def _sample_json(item: _Item, size: int) -> bytes:
    meta = {
        "uid": item.uid,
        "key": item.key,
        "caption": item.caption,
        "status": "success",
        "width": size,
        "height": size,
        "original_width": size,
        "original_height": size,
    }
    return json.dumps(meta, indent=4).encode("utf-8")


# img2dataset's per-shard parquet, restricted to what a synthetic pool has.
_SHARD_PARQUET_TYPES = {
    "key": pa.string(),
    "uid": pa.string(),
    "caption": pa.string(),
    "status": pa.string(),
    "width": pa.int64(),
    "height": pa.int64(),
}


def _write_parquet(fs: Any, path: str, columns: dict[str, list], types: dict[str, Any]) -> None:
    table = pa.table({name: pa.array(values, type=types[name]) for name, values in columns.items()})
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)


def _write_json(fs: Any, path: str, obj: Any) -> None:
    with fs.open(path, "wb") as f:
        f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def _write_split(out: str, items: list[_Item], cfg: SynthConfig) -> tuple[list[str], dict]:
    """Write tars, ``sizes.json`` and per-shard parquets; return shard names, sizes."""
    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/")
    with ShardWriter(out, cfg.shard_size) as writer:
        for item in items:
            writer.write(
                item.key,
                {
                    "jpg": item.jpg,
                    "txt": item.caption.encode("utf-8"),
                    "json": _sample_json(item, cfg.image_size),
                },
            )
    for s, name in enumerate(writer.shards):
        rows = items[s * cfg.shard_size : (s + 1) * cfg.shard_size]
        assert rows and rows[0].key.startswith(name[:-4]), "shard/key numbering out of step"
        _write_parquet(
            fs,
            f"{root}/{name[:-4]}.parquet",
            {
                "key": [r.key for r in rows],
                "uid": [r.uid for r in rows],
                "caption": [r.caption for r in rows],
                "status": ["success"] * len(rows),
                "width": [cfg.image_size] * len(rows),
                "height": [cfg.image_size] * len(rows),
            },
            _SHARD_PARQUET_TYPES,
        )
    return writer.shards, writer.sizes


def _shard_of(index: int, shard_size: int) -> str:
    return f"{index // shard_size:0{_KEY_SHARD_DIGITS}d}.tar"


def _scene_columns(items: Iterable[_Item]) -> dict[str, list[str]]:
    cols: dict[str, list[str]] = {
        "label": [],
        "colour": [],
        "size": [],
        "position": [],
        "background": [],
    }
    for it in items:
        sc = it.scene
        cols["label"].append(sc.shape if sc else "")
        cols["colour"].append(sc.colour if sc else "")
        cols["size"].append(sc.size if sc else "")
        cols["position"].append(sc.position if sc else "")
        cols["background"].append(sc.background if sc else "")
    return cols


def _rebased(summary: dict[str, Any], out: str) -> dict[str, Any]:
    """The summary with its data paths under ``out``.

    The summary records absolute patterns. A pool that was copied or moved
    would otherwise hand back its old location, and the data read from
    there may be gone or different.
    """
    old = str(summary.get("out", "")).rstrip("/")
    new = out.rstrip("/")
    if not old or old == new:
        return summary

    def move(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, str) and value.startswith(old + "/"):
            return new + value[len(old) :]
        return value

    return {**move(summary), "out": out}


def pool_summary(root: str) -> dict[str, Any] | None:
    """The ``synth.json`` of the generated pool in directory ``root``, its paths under ``root``
    (where the pool is now, whatever directory it was made in or from), or None."""
    url = f"{root.rstrip('/')}/{_SUMMARY_NAME}"
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return _rebased(json.loads(f.read().decode("utf-8")), root.rstrip("/"))


def _existing_pool(fs: Any, root: str, cfg: SynthConfig, overwrite: bool, out: str) -> dict | None:
    """The stored summary if this exact pool is already there; refuse to clobber others.

    A pool make-data did not finish (its writing marker) is this tool's own and is
    written again, whatever its config (walkthrough: the interrupted make-data said "run
    the same command again", which then refused the half-written pool)."""
    if fs.exists(f"{root}/{_WRITING_NAME}"):
        log.warning("out: %s holds a pool make-data did not finish; writing it again", out)
        return None
    summary_path = f"{root}/{_SUMMARY_NAME}"
    if fs.exists(summary_path):
        with fs.open(summary_path, "rb") as f:
            summary = json.loads(f.read().decode("utf-8"))
        if summary.get("config") == asdict(cfg) and not overwrite:
            return _rebased(summary, out)
        if not overwrite:
            raise ConfigError(
                f"out: {out} already holds a pool made with a different config; "
                "choose another directory, or pass --overwrite to delete its .tar, .parquet and "
                "sizes.json files (eval/ and target/ too) and write the pool"
            )
    elif not overwrite and fs.glob(f"{root}/*.tar"):
        raise ConfigError(
            f"out: {out} already contains tar shards but no {_SUMMARY_NAME} "
            "(foreign data, or a make-data of an earlier diffin that did not finish); choose "
            "another directory, or pass "
            "--overwrite to delete every .tar, .parquet and sizes.json file there "
            "(eval/ and target/ too) and write the pool"
        )
    return None


def _clear_pool(fs: Any, root: str) -> None:
    """Remove what a previous (possibly larger or unfinished) pool left behind, so no stale
    shard is picked up by a brace pattern or a directory listing."""
    for pattern in ("*.tar", "*.tar.tmp-*", "*.parquet", "sizes.json", _SUMMARY_NAME):
        for sub in ("", "eval/", "target/"):
            for path in fs.glob(f"{root}/{sub}{pattern}"):
                fs.rm(path)


def unfinished_pool(shards: Sequence[str], limit: int = 16) -> str | None:
    """The folder of ``shards`` (or the pool above it: eval/, target/) that holds a pool
    make-data has not finished, or None. Only the first ``limit`` folders are asked: a
    generated pool is one folder, and a pool of many folders is not a generated one."""
    folders = list(dict.fromkeys(u.rsplit("/", 1)[0] for u in shards if "/" in u))[:limit]
    # the pool above a generated split only (above a bucket's root would be another bucket)
    above = [f.rsplit("/", 1)[0] for f in folders if f.rsplit("/", 1)[-1] in ("eval", "target")]
    for folder in dict.fromkeys([*folders, *above]):
        try:
            fs, path = fsspec.core.url_to_fs(f"{folder}/{_WRITING_NAME}")
            if fs.exists(path):
                return folder
        except Exception as exc:  # noqa: BLE001 (credentials that read objects but not list
            # them get 403 for a missing one, as PermissionError: not a marker; review)
            log.debug("data: cannot ask %s for an unfinished pool's marker: %s", folder, exc)
    return None


def make_pool(out: str, cfg: SynthConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Generate the pool, its truth table, the eval split and the curated target split under ``out``.

    Returns the summary that is also written to ``out/synth.json`` (last, so
    its presence marks a complete pool). A pool made earlier with the same
    config is kept and its summary returned, with its paths under ``out`` even
    if the pool was copied or moved there; a directory holding a different
    pool, or foreign shards, is refused unless ``overwrite`` is set.
    """
    cfg.validate()
    check_dir_target(out, "out")
    check_apart(out, "out", "pool")
    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    # only what is ours to delete: an unfinished pool, or any with --overwrite (a folder of
    # other files but no shards keeps them: written over only by name)
    clear = overwrite or fs.exists(f"{root}/{_WRITING_NAME}")
    existing = _existing_pool(fs, root, cfg, overwrite, out)
    if existing is not None:
        return existing
    _write_json(fs, f"{root}/{_WRITING_NAME}", {"config": asdict(cfg)})
    if clear:
        _clear_pool(fs, root)

    pool = _generate_pool(cfg)
    evals = _generate_eval(cfg)
    targets = _generate_target(cfg)
    uids = [it.uid for it in pool] + [it.uid for it in evals] + [it.uid for it in targets]
    if len(set(uids)) != len(uids):  # pragma: no cover - a sha256 collision
        raise RuntimeError("uid collision in the generated pool")

    base = out.rstrip("/")
    shards, sizes = _write_split(base, pool, cfg)
    str_ = pa.string()
    scene_cols = _scene_columns(pool)
    truth = {
        "uid": [it.uid for it in pool],
        "key": [it.key for it in pool],
        "shard": [_shard_of(i, cfg.shard_size) for i in range(len(pool))],
        "defect": [it.defect for it in pool],
        "caption": [it.caption for it in pool],
        "true_caption": [it.scene.caption() if it.scene else "" for it in pool],
        "label": scene_cols["label"],
        "colour": scene_cols["colour"],
        "duplicate_of": [it.duplicate_of for it in pool],
        "size": scene_cols["size"],
        "position": scene_cols["position"],
        "background": scene_cols["background"],
    }
    _write_parquet(fs, f"{root}/truth.parquet", truth, {name: str_ for name in truth})

    eval_dir = f"{base}/eval"
    fs.makedirs(f"{root}/eval", exist_ok=True)
    eval_shards, eval_sizes = _write_split(eval_dir, evals, cfg)
    eval_cols = _scene_columns(evals)
    labels = {
        "uid": [it.uid for it in evals],
        "key": [it.key for it in evals],
        "label": eval_cols["label"],
        "colour": eval_cols["colour"],
        "caption": [it.caption for it in evals],
        "shard": [_shard_of(i, cfg.shard_size) for i in range(len(evals))],
        "size": eval_cols["size"],
        "position": eval_cols["position"],
        "background": eval_cols["background"],
    }
    _write_parquet(fs, f"{root}/eval/labels.parquet", labels, {name: str_ for name in labels})
    classes = {"classnames": list(SHAPES), "templates": list(ZERO_SHOT_TEMPLATES)}
    _write_json(fs, f"{root}/eval/classes.json", classes)

    target_dir = f"{base}/target"
    fs.makedirs(f"{root}/target", exist_ok=True)
    target_shards, target_sizes = _write_split(target_dir, targets, cfg)

    counts: dict[str, int] = {d: 0 for d in DEFECTS}
    for it in pool:
        counts[it.defect] += 1
    summary: dict[str, Any] = {
        "generator": "pipeline.data.synth",
        "out": out,
        "config": asdict(cfg),
        "samples": len(pool),
        "shards": shards,
        "sizes": sizes,
        "train_data": brace_pattern(base, 0, len(shards) - 1),
        "defects": counts,
        "truth": "truth.parquet",
        "eval": {
            "samples": len(evals),
            "shards": eval_shards,
            "sizes": eval_sizes,
            "val_data": brace_pattern(eval_dir, 0, len(eval_shards) - 1) if eval_shards else None,
            "labels": "eval/labels.parquet",
            "classes": "eval/classes.json",
            "classnames": list(SHAPES),
        },
        "target": {
            "samples": len(targets),
            "shards": target_shards,
            "sizes": target_sizes,
            "data": brace_pattern(target_dir, 0, len(target_shards) - 1) if target_shards else None,
        },
        "image_size": cfg.image_size,
    }
    _write_json(fs, f"{root}/{_SUMMARY_NAME}", summary)
    fs.rm(f"{root}/{_WRITING_NAME}")
    return summary
