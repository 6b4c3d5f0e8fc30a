"""The balanced keep rule: the best rows within each group (a column's values, or k-means clusters).

Groups need every row's group and score at once, so this rule holds O(rows)
numbers in memory (a group code, a score key, and the uids of the ok rows).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import ConfigError
from pipeline.prune.config import PruneConfig
from pipeline.prune.select import Selection, Table, _ok, score_keys


def quotas(sizes: np.ndarray, keep: float, how: str) -> np.ndarray:
    """Rows to keep per group: ``keep`` of each ("proportional"), or equal shares ("equal")."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = max(1, int(round(keep * sizes.sum()))) if sizes.sum() else 0
    if how == "proportional":
        # Largest remainder: the quotas add up to the fraction rule's count
        # (rounding each group on its own drifts, and can keep nothing).
        ideal = keep * sizes
        q = np.minimum(np.floor(ideal).astype(np.int64), sizes)
        short = total - int(q.sum())
        if short > 0:
            frac = np.where(q < sizes, ideal - q, -1.0)
            order = np.lexsort((np.arange(len(sizes)), -frac))  # ties: group order
            q[order[:short]] += 1
        return q
    q = np.zeros_like(sizes)
    left = total
    open_ = sizes > 0
    # Water-filling: an equal share for every group not yet full; small groups
    # are kept whole and what they leave is shared among the others.
    while left > 0 and open_.any():
        share = left // int(open_.sum())
        if share == 0:
            # Fewer rows left than open groups: one more each, in group order.
            for g in np.flatnonzero(open_)[:left]:
                q[g] += 1
            break
        add = np.where(open_, np.minimum(share, sizes - q), 0)
        q += add
        left -= int(add.sum())
        open_ = q < sizes
    return q


NULL_GROUP = "<null>"


def _group_labels(col: pa.Array, by: str) -> np.ndarray:
    """A column's values as group names: missing values form the group ``<null>``."""
    if pa.types.is_floating(col.type):
        col = pc.add(col, pa.scalar(0.0, col.type))  # -0.0 + 0.0 = 0.0: one group for zero
    text = pc.cast(col, pa.string())
    if pc.any(pc.equal(text, NULL_GROUP)).as_py():
        raise ConfigError(
            f"balance_by: column {by!r} holds the value {NULL_GROUP!r}, the name of the group of "
            "missing values; rename those values"
        )
    return pc.fill_null(text, NULL_GROUP).to_numpy(zero_copy_only=False)


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
    oks, keys, uids, groups, shards, indices = [], [], [], [], [], []
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
        uids.append(np.where(use, b.column("uid").to_numpy(zero_copy_only=False), ""))
        if by == "cluster":
            shards.append(b.column("shard").to_numpy(zero_copy_only=False))
            indices.append(b.column("index").to_numpy(zero_copy_only=False))
        else:
            groups.append(_group_labels(b.column(by), by))
    ok = np.concatenate(oks) if oks else np.zeros(0, bool)
    rows = len(ok)
    key = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    uid = np.concatenate(uids).astype(str) if uids else np.zeros(0, str)
    extra: dict[str, np.ndarray] = {}
    if by == "cluster":
        from pipeline.prune.clusters import cluster_rows

        shard = np.concatenate(shards) if shards else np.zeros(0, object)
        index = np.concatenate(indices) if indices else np.zeros(0, np.int64)
        code, cinfo = cluster_rows(cfg, table.url, shard, index, ok)
        info = {**info, "clusters": cinfo}
        extra["cluster"] = code.astype(np.int32)  # -1 where not scorable
        names = np.arange(max(cfg.clusters, 1))
    else:
        group = np.concatenate(groups) if groups else np.zeros(0, object)
        names, code = np.unique(group[ok], return_inverse=True)
        full = np.full(rows, -1, np.int64)
        full[ok] = code
        code = full
    sizes = np.bincount(code[ok], minlength=len(names)) if ok.any() else np.zeros(len(names), int)
    q = quotas(sizes, cfg.keep, cfg.balance)
    kept = np.zeros(rows, bool)
    idx = np.flatnonzero(ok)
    order = idx[np.lexsort((uid[idx], ~key[idx], code[idx]))]  # by group, score desc, uid
    g_sorted = code[order]
    starts = np.searchsorted(g_sorted, np.arange(len(names)))
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
