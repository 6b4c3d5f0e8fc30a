"""Keep rules over a score table that need not fit in memory.

The table is read as a stream of record batches (Parquet row groups), only
the columns a pass needs. ``fraction`` and ``threshold`` rules, on one
scorer's column or a z-score fusion, never hold more than a batch plus a
65,536-bin histogram: the exact cut of a top fraction is found by radix
selection on an order-preserving 64-bit key of the score (16 bits per pass;
it stops as soon as the boundary bucket holds few rows, which are then
sorted exactly; many rows tied at the cut's exact score go through the same
radix on their uid and row position), so the result is the same as a full
sort with ties broken by uid. Rank fusion and the balanced rules need global ranks or groups and
hold O(rows) numbers (not strings) in memory; they say so in the manifest.

:func:`plan` returns a :class:`Selection`; :meth:`Selection.kept_batches`
streams the kept rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import ConfigError
from pipeline.prune.config import NON_SCORE_COLUMNS, PruneConfig
from pipeline.prune.datacomp import uid_halves

BATCH_ROWS = 1 << 18
_DIGIT_BITS = 16
_BINS = 1 << _DIGIT_BITS
# Stop refining when the boundary bucket holds at most this many rows.
_CANDIDATE_CAP = 1 << 16
_SIGN = np.uint64(1 << 63)


@contextlib.contextmanager
def _parquet(url: str) -> Iterator[pq.ParquetFile]:
    with fsspec.open(url, "rb") as f:
        # pre_buffer would coalesce the reads of many row groups ahead (all of
        # the selected columns, for a local file): memory grows with the table.
        yield pq.ParquetFile(f, pre_buffer=False)


class Table:
    """A Parquet score table read in batches, a pass at a time."""

    def __init__(self, url: str, batch_rows: int = BATCH_ROWS) -> None:
        self.url = url
        self.batch_rows = batch_rows
        with _parquet(url) as pf:
            self.schema = pf.schema_arrow
            self.num_rows = pf.metadata.num_rows
        self.columns = self.schema.names

    def batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        with _parquet(self.url) as pf:
            yield from pf.iter_batches(batch_size=self.batch_rows, columns=columns)


def score_keys(scores: np.ndarray) -> np.ndarray:
    """Order-preserving uint64 keys of float64 scores (higher score -> higher key)."""
    # + 0.0 turns -0.0 into 0.0: the two compare equal, so they must share a key
    # for the uid to break the tie as a full sort would.
    bits = (np.asarray(scores, dtype=np.float64) + 0.0).view(np.uint64)
    neg = (bits & _SIGN) != 0
    return np.where(neg, ~bits, bits | _SIGN)


def key_to_score(key: int) -> float:
    k = np.uint64(key)
    bits = k & ~_SIGN if k & _SIGN else ~k
    return float(np.array([bits], dtype=np.uint64).view(np.float64)[0])


def _floats(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    # safe=False: an integer beyond 2**53 rounds to the nearest float64 instead of failing
    as_float = pc.cast(col, pa.float64(), safe=False)
    return np.asarray(pc.fill_null(as_float, np.nan).to_numpy(zero_copy_only=False))


def _ok(batch: pa.RecordBatch) -> np.ndarray:
    return np.asarray(
        pc.fill_null(pc.equal(batch.column("status"), "ok"), False).to_numpy(zero_copy_only=False)
    )


@dataclass
class Selection:
    """What a rule keeps, and the counts that go in the manifest."""

    cfg: PruneConfig
    table: Table
    rows: int
    rows_ok: int
    rows_error: int
    scorable: int  # ok rows with a finite score
    kept: int  # rows the rule keeps
    score_columns: list[str]  # the table columns the ranking score is made of
    _score: Callable[[pa.RecordBatch, int], np.ndarray] = field(repr=False)
    _mask: Callable[[pa.RecordBatch, int, np.ndarray], np.ndarray] = field(repr=False)
    extra: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # per-row columns
    info: dict[str, Any] = field(default_factory=dict)
    in_memory: bool = False

    def kept_batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """Kept rows in table order with ``columns``, the ranking score and extra columns."""
        columns = [c for c in columns if c in self.table.columns]
        need = list(dict.fromkeys([*columns, "status", "uid", *self.score_columns]))
        offset = 0
        for batch in self.table.batches(need):
            n = batch.num_rows
            score = self._score(batch, offset)
            mask = self._mask(batch, offset, score)
            if mask.any():
                idx = np.flatnonzero(mask)
                out = batch.select(columns).take(pa.array(idx))
                if self.cfg.score_name not in columns:
                    out = out.append_column(self.cfg.score_name, pa.array(score[idx]))
                for name, values in self.extra.items():
                    out = out.append_column(name, pa.array(values[offset : offset + n][idx]))
                yield out
            offset += n


def _score_fn(cfg: PruneConfig, table: Table) -> tuple[list[str], Callable, dict[str, Any], bool]:
    """The ranking score of a batch (NaN where not scorable), its columns, info, in-memory flag."""
    scored = [c for c in table.columns if c not in NON_SCORE_COLUMNS]
    cols = list(cfg.fusion) if cfg.fusion else [cfg.method]
    for c in cols:
        if c not in table.columns:
            field_name = "fusion" if cfg.fusion else "method"
            raise ConfigError(
                f"{field_name}: no column {c!r} in the score table; columns: {scored} (to "
                f"score it, name it in `diffin score --methods` with the scorers to keep: a "
                "rescore's table holds only the scorers it is given; their earlier columns are kept, "
                "not computed again)"
            )
    for c in cols:
        kind = table.schema.field(c).type
        if not (pa.types.is_floating(kind) or pa.types.is_integer(kind)):
            field_name = "fusion" if cfg.fusion else "method"
            raise ConfigError(f"{field_name}: column {c!r} is not numeric ({kind})")
    if not cfg.fusion:
        (col,) = cols
        return cols, lambda b, _o: _floats(b.column(col)), {}, False
    if cfg.score_name in table.columns:
        # keep.parquet and the manifest's threshold would show that column, not the fused score
        raise ConfigError(
            f"fusion: the score table already has a column {cfg.score_name!r}, the name of the "
            "fused score; rename that column"
        )

    weights = {c: float(w) for c, w in cfg.fusion.items()}
    if cfg.fusion_norm == "zscore":
        # One pass: mean and std of each column over rows where all are usable,
        # batch moments merged by Chan et al.'s update (sum and sum of squares
        # cancel catastrophically when a column's offset dwarfs its spread).
        moments = {c: (0, 0.0, 0.0) for c in cols}  # count, mean, sum of squared deviations
        for b in table.batches(["status", *cols]):
            vals = {c: _floats(b.column(c)) for c in cols}
            use = _ok(b) & np.logical_and.reduce([np.isfinite(v) for v in vals.values()])
            if use.any():
                for c in cols:
                    moments[c] = _merge_moments(moments[c], vals[c][use])
        stats = {}
        for c in cols:
            n, mean, m2 = moments[c]
            std = float(np.sqrt(m2 / n)) if n else 0.0
            stats[c] = (mean, std or 1.0)

        def zfused(b: pa.RecordBatch, _o: int) -> np.ndarray:
            out = np.zeros(b.num_rows)
            for c in cols:
                mean, std = stats[c]
                out += weights[c] * (_floats(b.column(c)) - mean) / std
            return out

        info = {"fusion_stats": {c: {"mean": m, "std": sd} for c, (m, sd) in stats.items()}}
        return cols, zfused, info, False

    # rank: each column's rank among the usable rows, scaled to [0, 1]; needs them all.
    values = {c: [] for c in cols}
    oks = []
    for b in table.batches(["status", *cols]):
        oks.append(_ok(b))
        for c in cols:
            values[c].append(_floats(b.column(c)))
    ok = np.concatenate(oks) if oks else np.zeros(0, bool)
    arrs = {c: np.concatenate(v) if v else np.zeros(0) for c, v in values.items()}
    use = ok & np.logical_and.reduce([np.isfinite(a) for a in arrs.values()])
    fused = np.full(len(ok), np.nan)
    m = int(use.sum())
    acc = np.zeros(m)
    for c in cols:
        v = arrs[c][use]
        ranks = _average_ranks(v)
        acc += weights[c] * (ranks / (m - 1) if m > 1 else np.zeros(m))
    fused[use] = acc
    return cols, lambda b, o: fused[o : o + b.num_rows], {}, True


def _merge_moments(acc: tuple[int, float, float], v: np.ndarray) -> tuple[int, float, float]:
    """(count, mean, M2) of ``acc``'s values followed by ``v``."""
    n_a, mean_a, m2_a = acc
    n_b = len(v)
    mean_b = float(v.mean())
    m2_b = float(((v - mean_b) ** 2).sum())
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * n_b / n, m2_a + m2_b + delta * delta * n_a * n_b / n


def _average_ranks(v: np.ndarray) -> np.ndarray:
    """0-based ranks, ties sharing their average rank (so tied scores fuse equally)."""
    order = np.argsort(v, kind="stable")
    sv = v[order]
    ranks = np.empty(len(v))
    starts = np.flatnonzero(np.r_[True, sv[1:] != sv[:-1]])
    ends = np.r_[starts[1:], len(v)]
    avg = (starts + ends - 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def plan(
    cfg: PruneConfig, table_url: str, batch_rows: int = BATCH_ROWS, ensemble: Sequence[str] = ()
) -> Selection:
    """Decide what ``cfg`` keeps from the table at ``table_url`` (validated first).

    ``ensemble``: the score tables of other runs of the same pool; every score column is
    then the mean over all the tables (:mod:`pipeline.prune.ensemble`).
    """
    cfg.validate()
    if ensemble:
        from pipeline.prune.ensemble import EnsembleTable

        table = EnsembleTable(table_url, ensemble, list(cfg.fusion or [cfg.method]), batch_rows)
    else:
        table = Table(table_url, batch_rows)
    for need in ("uid", "status"):
        if need not in table.columns:
            raise ConfigError(f"run: the score table has no {need!r} column")
    cols, score, info, in_memory = _score_fn(cfg, table)
    if cfg.rule == "balanced":
        from pipeline.prune.balanced import plan_balanced

        return plan_balanced(cfg, table, cols, score, info)

    # Pass: counts and the first histogram digit.
    rows = ok_rows = above_threshold = 0
    hist = np.zeros(_BINS, np.int64)
    offset = 0
    for b in table.batches(["status", *cols]):
        ok = _ok(b)
        rows += b.num_rows
        ok_rows += int(ok.sum())
        s = score(b, offset)
        offset += b.num_rows
        use = ok & np.isfinite(s)
        if cfg.rule == "threshold":
            above_threshold += int((s[use] >= float(cfg.threshold)).sum())
        hist += np.bincount(
            (score_keys(s[use]) >> np.uint64(64 - _DIGIT_BITS)).astype(np.int64), minlength=_BINS
        )
    scorable = int(hist.sum())
    sel = dict(
        cfg=cfg,
        table=table,
        rows=rows,
        rows_ok=ok_rows,
        rows_error=rows - ok_rows,
        scorable=scorable,
        score_columns=cols,
        _score=score,
        info=info,
        in_memory=in_memory,
    )

    if cfg.rule == "threshold":
        t = float(cfg.threshold)

        def above(b: pa.RecordBatch, _o: int, s: np.ndarray) -> np.ndarray:
            return _ok(b) & np.isfinite(s) & (s >= t)

        return Selection(**sel, kept=above_threshold, _mask=above)

    k = max(1, int(round(cfg.keep * scorable))) if scorable else 0
    if k == 0:
        return Selection(**sel, kept=0, _mask=lambda b, _o, _s: np.zeros(b.num_rows, bool))
    cut_key, cut_uid, cut_pos, passes = _radix_cut(table, cols, score, hist, k)
    info = {**info, "selection_passes": passes}
    sel["info"] = info
    cut_key_u = np.uint64(cut_key)

    def top(b: pa.RecordBatch, offset: int, s: np.ndarray) -> np.ndarray:
        use = _ok(b) & np.isfinite(s)
        keys = score_keys(np.where(use, s, 0.0))
        mask = use & (keys > cut_key_u)
        tie = use & (keys == cut_key_u)
        if tie.any():
            uids = b.column("uid").to_numpy(zero_copy_only=False)
            tie_idx = np.flatnonzero(tie)
            # A uid may repeat (merge counts duplicates): the row position is
            # the last tie-break, so exactly k rows pass.
            mask[tie_idx] = [
                u < cut_uid or (u == cut_uid and offset + i <= cut_pos)
                for u, i in zip(uids[tie_idx], tie_idx, strict=True)
            ]
        return mask

    return Selection(**sel, kept=k, _mask=top)


def _tied_rows(
    table: Table, cols: list[str], score: Callable, key: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(uid hi, uid lo, row position) of the ok rows whose score key is ``key``, a batch at a time."""
    offset = 0
    for b in table.batches(["status", "uid", *cols]):
        s = score(b, offset)
        use = _ok(b) & np.isfinite(s)
        idx = np.flatnonzero(use & (score_keys(np.where(use, s, 0.0)) == np.uint64(key)))
        if len(idx):
            uids = b.column("uid").take(pa.array(idx)).to_pylist()
            hi, lo = uid_halves(uids)
            yield hi, lo, (offset + idx).astype(np.uint64)
        offset += b.num_rows


def _cut_among_ties(
    table: Table, cols: list[str], score: Callable, key: int, k: int
) -> tuple[str, int, int] | None:
    """(uid, row position, passes) of the k-th of the rows tied at ``key``, by uid then
    position, as :func:`_radix_cut` selects scores: 16 bits of (uid, position) a pass,
    then the few rows left sorted exactly. None when a uid is not 32 hex digits (the
    candidate pass then sorts the uid strings)."""
    fixed: list[int] = []  # the parts of (hi, lo, pos) already known
    passes = 0
    for part in range(3):
        prefix, shift = 0, 64 - _DIGIT_BITS
        while True:
            hist = np.zeros(_BINS, np.int64)
            passes += 1
            try:
                for rows in _tied_rows(table, cols, score, key):
                    v = _matching(rows, fixed, part, prefix, shift)
                    hist += np.bincount(
                        ((v >> np.uint64(shift)) & np.uint64(_BINS - 1)).astype(np.int64),
                        minlength=_BINS,
                    )
            except ValueError:  # not a 32-hex uid
                return None
            cum = np.cumsum(hist)
            digit = int(np.searchsorted(cum, k))  # first bucket from below reaching k
            k -= int(cum[digit] - hist[digit])
            prefix = (prefix << _DIGIT_BITS) | digit
            if hist[digit] <= _CANDIDATE_CAP:
                return _exact_tie(table, cols, score, key, fixed, part, prefix, shift, k, passes)
            if shift == 0:
                break
            shift -= _DIGIT_BITS
        fixed.append(prefix)
    hi, lo, pos = fixed  # pragma: no cover - positions are unique: a bucket of one
    return f"{hi:016x}{lo:016x}", pos, passes


def _known(rows: tuple, fixed: list[int]) -> np.ndarray:
    """Which tied rows have the parts of (hi, lo, pos) already chosen."""
    keep = np.ones(len(rows[0]), bool)
    for i, value in enumerate(fixed):
        keep &= rows[i] == np.uint64(value)
    return keep


def _matching(rows: tuple, fixed: list[int], part: int, prefix: int, shift: int) -> np.ndarray:
    """Part ``part`` of the tied rows that match the known parts and ``prefix`` above ``shift``."""
    v = rows[part][_known(rows, fixed)]
    if shift + _DIGIT_BITS < 64:  # the digits chosen above this one
        v = v[(v >> np.uint64(shift + _DIGIT_BITS)) == np.uint64(prefix)]
    return v


def _exact_tie(
    table: Table,
    cols: list[str],
    score: Callable,
    key: int,
    fixed: list[int],
    part: int,
    prefix: int,
    shift: int,
    k: int,
    passes: int,
) -> tuple[str, int, int]:
    """The candidate pass of :func:`_cut_among_ties`: its boundary bucket sorted exactly."""
    found = []
    for rows in _tied_rows(table, cols, score, key):
        keep = _known(rows, fixed) & ((rows[part] >> np.uint64(shift)) == np.uint64(prefix))
        found.append(np.stack([r[keep] for r in rows], axis=1))
    cand = np.concatenate(found)
    order = np.lexsort((cand[:, 2], cand[:, 1], cand[:, 0]))  # uid, then position
    hi, lo, pos = (int(x) for x in cand[order[k - 1]])
    return f"{hi:016x}{lo:016x}", pos, passes + 1


def _radix_cut(
    table: Table, cols: list[str], score: Callable, hist: np.ndarray, k: int
) -> tuple[int, str, int, int]:
    """The (key, uid, row position) of the k-th kept row, and the passes taken.

    The order is score descending, then uid ascending, then row position.
    """
    prefix, shift, above, passes = 0, 64 - _DIGIT_BITS, 0, 1
    while True:
        cum = np.cumsum(hist[::-1])
        idx = int(np.searchsorted(cum, k - above))  # first top-down bucket reaching k
        digit = _BINS - 1 - idx
        above += int(cum[idx] - hist[digit])
        prefix = (prefix << _DIGIT_BITS) | digit
        if hist[digit] <= _CANDIDATE_CAP:
            break
        if shift == 0:
            # More than the cap share the cut's exact score: the uid breaks the tie,
            # selected by the same radix on it (holding every tied uid took ~250
            # bytes a row: 2.5 GB for ten million rows of a bucketed score).
            tied = _cut_among_ties(table, cols, score, prefix, k - above)
            if tied is not None:
                return prefix, tied[0], tied[1], passes + tied[2]
            break
        shift -= _DIGIT_BITS
        hist = np.zeros(_BINS, np.int64)
        passes += 1
        offset = 0
        for b in table.batches(["status", *cols]):
            s = score(b, offset)
            offset += b.num_rows
            use = _ok(b) & np.isfinite(s)
            keys = score_keys(s[use])
            keys = keys[(keys >> np.uint64(shift + _DIGIT_BITS)) == np.uint64(prefix)]
            hist += np.bincount(
                ((keys >> np.uint64(shift)) & np.uint64(_BINS - 1)).astype(np.int64),
                minlength=_BINS,
            )
    # Candidate pass: the rows of the boundary bucket, sorted exactly.
    passes += 1
    cand_keys, cand_uids, cand_pos = [], [], []
    offset = 0
    for b in table.batches(["status", "uid", *cols]):
        s = score(b, offset)
        use = _ok(b) & np.isfinite(s)
        keys = score_keys(np.where(use, s, 0.0))
        hit = use & ((keys >> np.uint64(shift)) == np.uint64(prefix))
        if hit.any():
            idx = np.flatnonzero(hit)
            cand_keys.append(keys[idx])
            cand_uids.append(b.column("uid").to_numpy(zero_copy_only=False)[idx])
            cand_pos.append(offset + idx)
        offset += b.num_rows
    keys = np.concatenate(cand_keys)
    uids = np.concatenate(cand_uids).astype(str)
    pos = np.concatenate(cand_pos)
    order = np.lexsort((pos, uids, ~keys))  # key descending, uid ascending, position
    j = order[k - above - 1]
    return int(keys[j]), str(uids[j]), int(pos[j]), passes
