"""Self-attention whose keys/values come from other rows of the batch.

Every attention variant of the pack is one rule: query row r attends to the concatenation of the
keys/values of a few batch rows, each taken whole or only inside that row's region mask.

- Texture-aligning (eq. 3):    geo row  -> [geo; tar]
- Geometry-preserving (eq. 5): out row  -> [out; src inside M_src]
- Cross-image attention:       out row  -> [app]            (structure injection: [struct])

Rows without a rule keep plain self-attention. Keys are gathered, never masked with -inf, and the
attention itself is computed by the host's kernel, so no N x N map is ever materialised (except in
`contrast_attention`, which needs the map and computes it in query chunks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional
from collections.abc import Callable, Mapping, Sequence

import torch

# kernel(q, k, v) -> out, all [rows, tokens, heads * dim_head] (ComfyUI's optimized_attention layout)
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Ref:
    """Keys/values of batch row `row`; with `region_only`, only its tokens inside its region mask."""

    row: int
    region_only: bool = False


Refs = Optional[tuple[Ref, ...]]  # None: plain self-attention


def _resolve(row: int, refs: Refs, regions: Mapping[int, torch.Tensor]) -> Optional[list]:
    """[(row, token index or None)], or None where the rule reduces to plain self-attention."""
    if refs is None:
        return None
    parts = []
    for ref in refs:
        if ref.region_only:
            index = regions[ref.row]
            if index.dtype == torch.bool:
                index = index.nonzero().squeeze(1)
            if index.numel() == 0:
                continue  # an empty region contributes no keys
            parts.append((ref.row, index))
        else:
            parts.append((ref.row, None))
    if not parts or parts == [(row, None)]:
        return None
    return parts


def _span(rows: list[int]):
    """rows as a slice when they are consecutive (indexing with it is a view: no copy), else the list."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return rows


def _rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    return t[_span(rows)]


def _gather(t: torch.Tensor, rows: list[int], resolved: list, keys: int) -> torch.Tensor:
    """[len(rows), keys, C]: each row's parts concatenated along tokens, written once into one buffer.

    When every row of the group has the same part layout, part j of all rows is copied at once (a slice
    when the referenced rows are consecutive, e.g. every geo row's [geo; tar]); else row by row.
    """
    out = t.new_empty((len(rows), keys) + tuple(t.shape[2:]))
    layouts = {tuple(None if index is None else index.numel() for _, index in resolved[r]) for r in rows}
    if len(layouts) == 1:
        start = 0
        for j, size in enumerate(next(iter(layouts))):
            refs = [resolved[r][j][0] for r in rows]
            indices = [resolved[r][j][1] for r in rows]
            n = t.shape[1] if size is None else size
            if size is None:
                out[:, start:start + n] = _rows(t, refs)
            elif all(r == refs[0] and index is indices[0] for r, index in zip(refs, indices, strict=True)):
                out[:, start:start + n] = t[refs[0], indices[0]]  # one source region shared by every row
            else:
                for i, (r, index) in enumerate(zip(refs, indices, strict=True)):
                    out[i, start:start + n] = t[r, index]
            start += n
        return out
    for i, r in enumerate(rows):
        start = 0
        for row, index in resolved[r]:
            n = t.shape[1] if index is None else index.numel()
            out[i, start:start + n] = t[row] if index is None else t[row, index]
            start += n
    return out


def shared_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    refs: Sequence[Refs],
    kernel: Kernel,
    regions: Optional[Mapping[int, torch.Tensor]] = None,
    ref_kernel: Optional[Kernel] = None,
    base: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention where row r's keys/values are those named by refs[r].

    q: [R, N, C]; k, v: [R + E, N, C], rows R.. being reference-only rows (no query, e.g. recorded in
    another pass: trajectory.py); refs: one entry per row of q; regions: row -> its region's tokens, as a bool [N]
    mask or an index tensor (only rows referenced with region_only need one). `kernel` computes plain rows; `ref_kernel` (default:
    kernel) the rows with a rule. `base`, when given, is the plain output of the whole batch already
    computed (by another patch being chained): plain rows take it as is. When no row has an
    effective rule, the result is exactly kernel(q, k, v) (or `base`).
    """
    if len(refs) != q.shape[0]:
        raise ValueError(f"{len(refs)} attention rules for a batch of {q.shape[0]} rows")
    resolved = [_resolve(r, refs[r], regions or {}) for r in range(q.shape[0])]
    if all(parts is None for parts in resolved):
        return kernel(q, k[: q.shape[0]], v[: q.shape[0]]) if base is None else base

    ref_kernel = ref_kernel or kernel
    plain = [r for r, parts in enumerate(resolved) if parts is None]
    if base is not None:
        out = base.clone()
    else:
        out = q.new_empty(q.shape[:2] + v.shape[2:])
        if plain:
            out[_span(plain)] = kernel(_rows(q, plain), _rows(k, plain), _rows(v, plain))
    # rows whose key sets have the same length run as one batched kernel call
    groups: dict[int, list[int]] = {}
    for r, parts in enumerate(resolved):
        if parts is not None:
            length = sum(k.shape[1] if index is None else index.numel() for _, index in parts)
            groups.setdefault(length, []).append(r)
    for keys, rows in groups.items():
        k_cat = _gather(k, rows, resolved, keys)  # [len(rows), keys, C]
        v_cat = _gather(v, rows, resolved, keys)
        out[_span(rows)] = ref_kernel(_rows(q, rows), k_cat, v_cat)
    return out


def reference_attention(q, k, v, heads: int) -> torch.Tensor:
    """Naive softmax(q k^T / sqrt(d)) v with the explicit map: the tests' ground truth."""
    b, n, c = q.shape
    d = c // heads
    qh, kh, vh = (t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2).double() for t in (q, k, v))
    weights = torch.softmax(qh @ kh.transpose(-1, -2) / d ** 0.5, dim=-1)
    return (weights @ vh).transpose(1, 2).reshape(b, n, c).to(q.dtype)


def contrast_attention(q, k, v, heads: int, beta: float, chunk: int = 1024, clip: bool = False) -> torch.Tensor:
    """Cross-image attention's contrast (its eq. 3): A <- (A - mean(A)) * beta + mean(A), then A v.

    The mean is over the keys of each query's row of A (each row of a softmax sums to one, so the
    mean is 1 / keys). Queries are processed in chunks of `chunk` so memory stays
    O(chunk x keys) instead of O(N x keys). beta == 1 is plain attention. `clip` clamps the contrasted
    weights to [0, 1] as the official code does (the paper's eq. 3 has no clamp).
    """
    b, n, c = q.shape
    d = c // heads
    qh, kh, vh = (t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    out = torch.empty_like(qh)
    scale = d ** -0.5
    for start in range(0, n, chunk):
        sim = (qh[:, :, start:start + chunk].float() @ kh.transpose(-1, -2).float()) * scale
        weights = torch.softmax(sim, dim=-1)
        mean = weights.mean(dim=-1, keepdim=True)
        weights = (weights - mean) * beta + mean
        if clip:
            weights = weights.clamp(0.0, 1.0)
        out[:, :, start:start + chunk] = (weights @ vh.float()).to(q.dtype)
    return out.transpose(1, 2).reshape(b, n, c)
