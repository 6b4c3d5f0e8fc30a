"""Score one shard: a pure function of (run, config, shard), free of Ray.

The Ray actor in ``driver.py`` only holds one ``ShardScorer`` so that the
model, the checkpoints and the direction vectors are loaded once per worker.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from pipeline.data.reader import iter_shard, preprocess_error
from pipeline.data.sample import Sample
from pipeline.errors import ConfigError
from pipeline.influence.directions import KINDS, Directions, load_directions
from pipeline.influence.fast import DIRECTIONAL, fast_terms, reference_jets
from pipeline.influence.functional import ClipFunctions
from pipeline.influence.selfinf import SELF_TERMS, SelfInfluenceEngine
from pipeline.model import factory
from pipeline.model.batches import encode
from pipeline.rundir import RunDir
from pipeline.score.config import ScoreConfig
from pipeline.score.directions import (
    DIRECTION_TERMS,
    DTYPES,
    lin_direction,
    load_eigenpairs,
    load_set,
    resolve_form,
    resolve_objective,
)
from pipeline.score.table import build_part, write_table
from pipeline.score.trajectory import load_state_dict, load_trajectory
from pipeline.scorers import ScoreContext, Terms, get_scorers, needed_terms
from pipeline.tensors import load_tensors

log = logging.getLogger(__name__)


def _batches(samples: Iterator[Sample], size: int) -> Iterator[list[Sample]]:
    batch: list[Sample] = []
    for s in samples:
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encodes(sample: Sample, bundle: factory.ClipBundle) -> bool:
    """Whether the model's transforms take ``sample``; if not, it becomes an error row."""
    try:
        encode([sample], bundle)
    except Exception as e:
        sample.error = preprocess_error(e)
        return False
    return True


def resident_bytes(*per_step: dict[int, Any]) -> int:
    """Bytes of the tensors held per checkpoint (parameters, ``lin`` dicts, Directions)."""
    total = 0
    for by_step in per_step:
        for held in by_step.values():
            # by kind, not as_flat(): that makes each vector contiguous, a copy on the device
            parts = (
                [t for kind in KINDS for t in getattr(held, kind).values()]
                if isinstance(held, Directions)
                else held.values()
            )
            total += sum(t.numel() * t.element_size() for t in parts)
    return total


def _on_device(directions: Directions, need: set[str], device: torch.device) -> Directions:
    """The vectors the terms in ``need`` read, on ``device``; the others left empty."""
    used = {
        "g_V": bool(need & DIRECTIONAL),  # reference_jets takes its JVP for any of them
        "g_B": bool("hz" in need or need & SELF_TERMS),
        "w": "hb" in need,
        "u": "hv" in need,
    }
    return Directions(
        *(
            {k: v.to(device) for k, v in getattr(directions, kind).items()} if used[kind] else {}
            for kind in KINDS
        ),
        directions.meta,
    )


class ShardScorer:
    def __init__(self, run_url: str, cfg: ScoreConfig, device: str | None = None) -> None:
        """``device``: where to score ("cuda", "cpu"); default: a GPU when one is visible.

        Under Ray the actor passes the device Ray gave it: Ray no longer hides
        the GPUs from an actor that asked for none, so "visible" is not "ours".
        """
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.run = RunDir(run_url)
        self.traj = load_trajectory(self.run)
        form = resolve_form(cfg.second_order, self.traj)
        cfg = dataclasses.replace(cfg, second_order=form, objective=resolve_objective(cfg, form))
        self.cfg = cfg
        self.dtype = DTYPES[cfg.storage_dtype]
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        factory.exact_float32(self.device, self.dtype)
        if cfg.dtype == "amp_bf16" and self.device.type == "cpu":
            log.warning(
                "dtype amp_bf16 on a CPU: about 6 times slower than float32 on CPUs without "
                "bfloat16 units (docs/benchmarks.md); it is meant for GPUs"
            )
        self.bundle = factory.create(
            self.traj.model,
            device=self.device,
            dtype=self.dtype,
            preprocess_cfg=self.traj.preprocess_cfg,
        )
        ref_images, ref_tokens, _ = load_set(self.run, "reference", self.dtype)
        self.fns = ClipFunctions(
            self.bundle.model,
            ref_images.to(self.device),
            ref_tokens.to(self.device),
            removal=cfg.sample_gradient == "removal",
        )
        self.scorers = get_scorers(cfg.methods)
        self.ctx = ScoreContext(
            self.traj.checkpoints, self.traj.n_train, cfg.seed, cfg.score_options()
        )
        names = [n for n, _ in self.bundle.model.named_parameters()]
        # hb and hv only enter as W_hb hb + W_hv hv: one JVP along W_hb w + W_hv u (fast.py);
        # the propagated form's I_t is one JVP along r_t - W_first g_V.
        weights = dict(
            zip([c.step for c in self.traj.checkpoints], self.ctx.weights(), strict=True)
        )
        self.params, self.directions, self.need, self.lin = {}, {}, {}, {}
        for c in self.traj.checkpoints:
            need = needed_terms(self.scorers, c, self.ctx)
            if not need:
                continue
            state = load_state_dict(self.run, self.traj, c.step)
            self.params[c.step] = {k: state[k].to(self.device, self.dtype) for k in names}
            self.need[c.step] = need
            if need & DIRECTION_TERMS:  # the same test ensure_directions used
                # read on the host: only the vectors this checkpoint's terms use go to the
                # device (each is the model's size; the default diffin needs g_V alone)
                host = load_directions(self.run.directions(c.step)).ordered(names)
                if "hlin" in need:
                    lin = lin_direction(
                        self.run,
                        c.step,
                        host,
                        weights[c.step],
                        self.ctx.second_order,
                        self.cfg.objective,
                    )
                    self.lin[c.step] = {k: v.to(self.device) for k, v in lin.items()}
                self.directions[c.step] = _on_device(host, need, self.device)
        self.resident_bytes = resident_bytes(self.params, self.lin, self.directions)
        # m checkpoints of the model and its vectors stay on the device for the whole run: the
        # size a user must fit (docs/operations.md, "Choosing m"), said before the first batch
        log.info(
            "actor holds %d checkpoints on %s: %.1f MB of parameters and direction vectors",
            len(self.params),
            self.device,
            self.resident_bytes / 2**20,
        )
        # The references' embeddings and their derivatives, once per checkpoint (fast.py).
        self.jets = {
            step: reference_jets(
                self.fns,
                self.params[step],
                self.directions.get(step),
                need - SELF_TERMS,
                self.lin.get(step),
            )
            for step, need in self.need.items()
        }
        self.self_engines: dict[int, SelfInfluenceEngine] = {}
        if any(need & SELF_TERMS for need in self.need.values()):
            gb, _ = load_tensors(self.run.set_file("grad_batches"))
            grad_batches = [
                (gb["images"][i].to(self.device, self.dtype), gb["tokens"][i].to(self.device))
                for i in range(gb["images"].shape[0])
            ]
            self_cfg = cfg.self_config(
                None if "self_hb" in set().union(*self.need.values()) else "none"
            )
            for step, need in self.need.items():
                if need & SELF_TERMS:
                    eigen = load_eigenpairs(self.run, step) if self_cfg.hb == "lanczos" else None
                    if eigen is not None:
                        vals, vecs = eigen
                        eigen = (
                            vals.to(self.device),
                            {k: v.to(self.device) for k, v in vecs.items()},
                        )
                    self.self_engines[step] = SelfInfluenceEngine(
                        self.fns,
                        self.params[step],
                        self.directions[step].g_B,
                        grad_batches,
                        self_cfg,
                        eigen,
                        # the fisher form's sketch tables, the same at every checkpoint: once
                        sketch=getattr(
                            next(iter(self.self_engines.values()), None), "sketch", None
                        ),
                    )
            plan = next(iter(self.self_engines.values())).config
            log.info(
                "self-influence within %d MB: H_B form %s (rank %d, sketch dim %d, %.1f MB "
                "resident), chunk %d samples of %.1f MB, %d parameters",
                plan["memory_mb"],
                plan["hb"],
                plan["rank"],
                plan["dim"],
                plan["resident_mb"],
                plan["chunk"],
                plan["mb_per_sample"],
                plan["params"],
            )
        self.columns = [col for s in self.scorers for col in s.columns(self.ctx)]
        self._subsets: dict[tuple[str, ...], tuple[list, dict[int, set[str]], list[str]]] = {}

    def subset(self, methods: list[str] | None) -> tuple[list, dict[int, set[str]], list[str]]:
        """The scorers named in ``methods`` (all when None), the terms they need per
        checkpoint, and their columns: a rerun that keeps an earlier part's columns of
        some scorers computes only the others (score/reuse.py)."""
        if methods is None:
            return self.scorers, self.need, self.columns
        key = tuple(methods)
        if key not in self._subsets:  # asked once per batch: planned once per subset
            self._subsets[key] = self._plan(methods)
        return self._subsets[key]

    def _plan(self, methods: list[str]) -> tuple[list, dict[int, set[str]], list[str]]:
        scorers = [s for s in self.scorers if s.name in methods]
        by_step = {c.step: c for c in self.traj.checkpoints}
        need = {
            step: n for step in self.need if (n := needed_terms(scorers, by_step[step], self.ctx))
        }
        return scorers, need, [col for s in scorers for col in s.columns(self.ctx)]

    def columns_of(self, method: str) -> list[str]:
        """The columns scorer ``method`` writes for this run's checkpoints (none for a name
        the registry no longer has)."""
        try:
            (scorer,) = get_scorers([method])
        except ConfigError:
            return []
        return scorer.columns(self.ctx)

    def score_samples(
        self, samples: list[Sample], methods: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Score columns for the ok samples of ``samples``, in order; ``methods``: only
        those scorers' columns (default: every scorer of the config)."""
        scorers, needs, columns = self.subset(methods)
        ok = [s for s in samples if s.ok]
        if not ok:
            return {c: np.zeros(0) for c in columns}
        try:
            images, tokens = encode(ok, self.bundle)
        except Exception:  # one sample the transforms refuse must not cost the shard
            ok = [s for s in ok if _encodes(s, self.bundle)]
            if not ok:
                return {c: np.zeros(0) for c in columns}
            images, tokens = encode(ok, self.bundle)
        images, tokens = images.to(self.device, self.dtype), tokens.to(self.device)
        terms: Terms = {}
        for step, need in needs.items():
            # amp_bf16: the batch's passes in bfloat16; the references' jets were computed
            # once in float32, and the terms come out as float32 reductions
            with self.cfg.autocast(self.device):
                t = fast_terms(
                    self.fns,
                    self.params[step],
                    self.directions.get(step),
                    images,
                    tokens,
                    need - SELF_TERMS,
                    self.jets[step],
                    self.lin.get(step),
                )
            if need & SELF_TERMS:
                t.update(self.self_engines[step].terms(images, tokens))
            terms[step] = {k: v.double().cpu().numpy() for k, v in t.items()}
        uids = [s.uid for s in ok]
        out: dict[str, np.ndarray] = {}
        for scorer in scorers:
            out.update(scorer.score(terms, uids, self.ctx))
        return out

    def score_shard(self, url: str, name: str) -> dict[str, Any]:
        """Score every sample of one shard and write its part atomically; returns counts."""
        t0 = time.time()
        samples: list[Sample] = []
        chunks: list[dict[str, np.ndarray]] = []
        rows = iter_shard(url, **self.cfg.reader_options(), transform=self.bundle.preprocess)
        for batch in _batches(rows, self.cfg.batch_size):
            chunks.append(self.score_samples(batch))
            for s in batch:  # keep rows, not decoded pixels
                s.image = None
            samples.extend(batch)
        scores = {
            c: np.concatenate([ch[c] for ch in chunks]) if chunks else np.zeros(0)
            for c in self.columns
        }
        table = build_part(samples, scores, self.columns)
        write_table(table, self.run.part(name))
        errors = sum(not s.ok for s in samples)
        return {
            "shard": url,
            "name": name,
            "rows": len(samples),
            "ok": len(samples) - errors,
            "errors": errors,
            "seconds": round(time.time() - t0, 3),
        }
