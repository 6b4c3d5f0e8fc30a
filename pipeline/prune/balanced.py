"""The balanced keep rule: the best rows within each group (a column's values, or k-means clusters).

Groups need every row's group and score at once, so this rule holds O(rows)
numbers in memory: a group code, a score key and the uid as two 64-bit
halves per row, plus sort indices (a few tens of bytes per row; clusters also
hold each row's shard name and an embedding per ok row).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import ConfigError
from pipeline.prune.config import PruneConfig
from pipeline.prune.datacomp import uid_halves
from pipeline.prune.select import Selection, Table, _ok, score_keys

log = logging.getLogger(__name__)


def quotas(
    sizes: np.ndarray,
    keep: float,
    how: str,
    prefer: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Rows to keep per group: ``keep`` of each ("proportional"), or equal shares ("equal").

    Rounding leaves a few spare rows to hand out one per group. ``prefer(groups,
    ranks)`` says which groups get them first: a sort key (lower first) for each
    group's row at ``ranks`` in its own order, i.e. the row a spare would keep.
    Without it, groups come in their order.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    total = max(1, int(round(keep * sizes.sum()))) if sizes.sum() else 0

    def first(groups: np.ndarray, ranks: np.ndarray) -> np.ndarray:
        tie = prefer(groups, ranks) if prefer is not None else np.zeros(len(groups))
        return groups[np.lexsort((groups, tie))]

    if how == "proportional":
        # Largest remainder: the quotas add up to the fraction rule's count
        # (rounding each group on its own drifts, and can keep nothing).
        ideal = keep * sizes
        q = np.minimum(np.floor(ideal).astype(np.int64), sizes)
        short = total - int(q.sum())
        if short > 0:
            frac = ideal - q
            # Largest remainder first; equal remainders (equal group sizes) go
            # to the group whose next row scores best, not to the first name.
            for f in np.unique(frac[q < sizes])[::-1]:
                tied = np.flatnonzero((frac == f) & (q < sizes))
                take = first(tied, q[tied])[:short]
                q[take] += 1
                short -= len(take)
                if short == 0:
                    break
        return q
    q = np.zeros_like(sizes)
    left = total
    open_ = sizes > 0
    # Water-filling: an equal share for every group not yet full; small groups
    # are kept whole and what they leave is shared among the others.
    while left > 0 and open_.any():
        share = left // int(open_.sum())
        if share == 0:
            # Fewer rows left than open groups: one more each to the best next rows.
            groups = np.flatnonzero(open_)
            q[first(groups, q[groups])[:left]] += 1
            break
        add = np.where(open_, np.minimum(share, sizes - q), 0)
        q += add
        left -= int(add.sum())
        open_ = q < sizes
    return q


NULL_GROUP = "<null>"


def _group_codes(col: pa.Array, by: str, names: dict[str, int]) -> np.ndarray:
    """A column's values as group codes (``names``: group name -> code, grown in place).

    Missing values form the group ``<null>``. Rows hold a code, not a string.
    """
    if pa.types.is_floating(col.type):
        col = pc.add(col, pa.scalar(0.0, col.type))  # -0.0 + 0.0 = 0.0: one group for zero
    text = pc.cast(col, pa.string())
    if pc.any(pc.equal(text, NULL_GROUP)).as_py():
        raise ConfigError(
            f"balance_by: column {by!r} holds the value {NULL_GROUP!r}, the name of the group of "
            "missing values; rename those values"
        )
    encoded = pc.dictionary_encode(pc.fill_null(text, NULL_GROUP))
    codes = [names.setdefault(v, len(names)) for v in encoded.dictionary.to_pylist()]
    return np.asarray(codes, np.int64)[encoded.indices.to_numpy(zero_copy_only=False)]


def _uid_halves(col: pa.Array, use: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The uids of the ``use`` rows as two uint64 halves (zeros elsewhere)."""
    hi, lo = np.zeros(len(use), np.uint64), np.zeros(len(use), np.uint64)
    try:
        hi[use], lo[use] = uid_halves(col.filter(pa.array(use)).to_pylist())
    except ValueError as exc:
        raise ConfigError(f"uid: the balanced rule needs 32-hex uids ({exc})") from None
    return hi, lo


def plan_balanced(
    cfg: PruneConfig, table: Table, cols: list[str], score: Callable, info: dict[str, Any]
) -> Selection:
    by = cfg.balance_by
    assert by is not None
    if by != "cluster" and by not in table.columns:
        raise ConfigError(
            f"balance_by: no column {by!r} in the score table; columns: {table.columns}"
        )
    read = ["status", "uid", *cols] + ([by] if by != "cluster" else ["shard", "index"])
    oks, keys, his, los, codes, shards, indices = [], [], [], [], [], [], []
    labels: dict[str, int] = {}
    status_ok = 0
    offset = 0
    for b in table.batches(list(dict.fromkeys(read))):
        s = score(b, offset)
        offset += b.num_rows
        is_ok = _ok(b)
        status_ok += int(is_ok.sum())
        use = is_ok & np.isfinite(s)
        oks.append(use)
        keys.append(score_keys(np.where(use, s, 0.0)))
        hi, lo = _uid_halves(b.column("uid"), use)
        his.append(hi)
        los.append(lo)
        if by == "cluster":
            shards.append(b.column("shard").to_numpy(zero_copy_only=False))
            indices.append(b.column("index").to_numpy(zero_copy_only=False))
        else:
            codes.append(_group_codes(b.column(by), by, labels))
    ok = np.concatenate(oks) if oks else np.zeros(0, bool)
    rows = len(ok)
    key = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    hi = np.concatenate(his) if his else np.zeros(0, np.uint64)
    lo = np.concatenate(los) if los else np.zeros(0, np.uint64)
    extra: dict[str, np.ndarray] = {}
    if by == "cluster":
        from pipeline.prune.clusters import cluster_rows

        shard = np.concatenate(shards) if shards else np.zeros(0, object)
        index = np.concatenate(indices) if indices else np.zeros(0, np.int64)
        code, cinfo = cluster_rows(cfg, table.url, shard, index, ok)
        info = {**info, "clusters": cinfo}
        extra["cluster"] = code.astype(np.int32)  # -1 where not scorable
        if cinfo["k"] < cfg.clusters:
            log.warning(
                "balance_by cluster: %d clusters, not the %d asked for: k-means makes at most "
                "one per scorable row (the manifest's name keeps the number asked for)",
                cinfo["k"],
                cfg.clusters,
            )
        names = np.arange(max(cinfo["k"], 1))
    else:
        # The groups that hold ranked rows, in name order, coded 0..G-1 (-1: not ranked).
        seen = np.concatenate(codes) if codes else np.zeros(0, np.int64)
        by_code = np.array(list(labels), dtype=object)
        present = np.unique(seen[ok])
        present = present[np.argsort(by_code[present], kind="stable")]
        names = by_code[present]
        recode = np.full(len(labels), -1, np.int64)
        recode[present] = np.arange(len(present))
        code = np.where(ok, recode[seen] if len(seen) else seen, -1)
    if by != "cluster" and len(names) > 1 and len(names) == int(ok.sum()):
        log.warning(
            "balance_by %s: every scorable row is a group of its own (%d groups), so each "
            "group's quota rounds keep x 1: balance by a column that groups rows",
            by,
            len(names),
        )
    sizes = np.bincount(code[ok], minlength=len(names)) if ok.any() else np.zeros(len(names), int)
    idx = np.flatnonzero(ok)
    order = idx[np.lexsort((lo[idx], hi[idx], ~key[idx], code[idx]))]  # group, score desc, uid
    g_sorted = code[order]
    starts = np.searchsorted(g_sorted, np.arange(len(names)))

    def prefer(groups: np.ndarray, ranks: np.ndarray) -> np.ndarray:
        rows = order[starts[groups] + ranks]  # the row a spare quota would keep
        return np.argsort(np.lexsort((lo[rows], hi[rows], ~key[rows])))

    q = quotas(sizes, cfg.keep, cfg.balance, prefer)
    kept = np.zeros(rows, bool)
    rank = np.arange(len(order)) - starts[g_sorted]
    kept[order[rank < q[g_sorted]]] = True
    info = {
        **info,
        "groups": {
            str(n): {"rows": int(sz), "kept": int(k)}
            for n, sz, k in zip(names.tolist(), sizes, q, strict=True)
        },
    }
    return Selection(
        cfg=cfg,
        table=table,
        rows=rows,
        rows_ok=status_ok,
        rows_error=rows - status_ok,
        scorable=int(ok.sum()),
        kept=int(kept.sum()),
        score_columns=cols,
        _score=score,
        _mask=lambda b, o, _s: kept[o : o + b.num_rows],
        extra=extra,
        info=info,
        in_memory=True,
    )
