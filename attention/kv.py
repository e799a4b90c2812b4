"""Self-attention whose keys/values come from other rows of the batch.

Every attention variant of the pack is one rule: query row r attends to the concatenation of the
keys/values of a few batch rows, each taken whole or only inside that row's region mask.

- Texture-aligning (eq. 3):    geo row  -> [geo; tar]
- Geometry-preserving (eq. 5): out row  -> [out; src inside M_src]
- Cross-image attention:       out row  -> [app]            (structure injection: [struct])

Rows without a rule keep plain self-attention. Keys are gathered, never masked with -inf, and the
attention itself is computed by the host's kernel, so no N x N map is ever materialised (except in
`contrast_attention`, which needs the map and computes it in query chunks).

Balance (a `Balance` on a Ref): the group's attention mass is multiplied by a weight w before the
softmax normalises, i.e. log(w) is added to the logits of that group's keys. It reaches the host's
kernel as its additive float `mask`, shaped [rows, 1, 1, keys] (broadcast over heads and queries:
memory linear in the keys). When every group of a row has the same weight the softmax is unchanged
and no mask is passed at all, so w = 1 is the paper bit for bit.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional
from collections.abc import Callable, Mapping, Sequence

import torch

# kernel(q, k, v) -> out, all [rows, tokens, heads * dim_head] (ComfyUI's optimized_attention layout).
# With a balance it is called as kernel(q, k, v, mask=bias), bias an additive float [rows, 1, 1, keys].
Kernel = Callable[..., torch.Tensor]

# auto balance: a region reference weighs as if it covered this fraction of its row's tokens
AUTO_AREA = 0.1
# queries per kernel call when a bias is passed: a host kernel that expands the bias to [rows, 1, queries,
# keys] (ComfyUI's xformers path does) then holds at most this many queries' worth, linear in the keys
BIAS_QUERY_CHUNK = 4096


@dataclass(frozen=True)
class Balance:
    """A weight w on one reference group's attention mass (log(w) on its keys' logits).

    With n_self keys of weight 1 and n_ref reference keys of weight w, all of equal logit, the
    reference share of a query's attention is  s = w n_ref / (n_self + w n_ref).
    manual: w = weight.
    auto:   w = weight * n0 / n_ref, n0 the group's canonical size: `area` x the row's tokens for a
            region reference (eqs. 6-7); a whole-row reference (eq. 3's target) is its own canonical
            size (w = weight). Then s = weight n0 / (n_self + weight n0) does not depend on n_ref:
            every region gets the share the paper (w = 1) gives a region of canonical size, at every layer.
    """

    weight: float = 1.0
    auto: bool = False
    area: float = AUTO_AREA

    def __post_init__(self):
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"balance weight must be a finite number > 0, got {self.weight}")
        if not 0 < self.area <= 1:
            raise ValueError(f"auto balance area must be in (0, 1], got {self.area}")

    def factor(self, n_keys: int, n_row: int, region_only: bool) -> float:
        """w for a group of n_keys keys: a region of a row of n_row tokens, or (not region_only) a whole row."""
        if not (self.auto and region_only):
            return float(self.weight)
        return float(self.weight) * self.area * n_row / n_keys


@dataclass(frozen=True)
class Ref:
    """Keys/values of batch row `row`; with `region_only`, only its tokens inside its region mask;
    `balance`: a weight on this group's attention mass (None: 1, the paper)."""

    row: int
    region_only: bool = False
    balance: Optional[Balance] = None


Refs = Optional[tuple[Ref, ...]]  # None: plain self-attention


def _weights(refs: Refs, parts: Optional[list], n_row: int, n_image: Optional[int] = None
             ) -> Optional[list[tuple[int, float]]]:
    """[(keys, w)] per part of a resolved rule ([(row, token index or None)]); None when every w is equal
    (the softmax is then unchanged: no bias). n_row: tokens of a whole row; n_image: the tokens a region mask
    indexes, a region's canonical base for auto (default n_row; fewer where a row also holds text tokens)."""
    if parts is None or all(ref.balance is None for ref in refs):
        return None
    balance = {(ref.row, ref.region_only): ref.balance for ref in refs}
    groups = []
    for row, index in parts:
        n = n_row if index is None else index.numel()
        b = balance.get((row, index is not None))
        groups.append((n, 1.0 if b is None else b.factor(n, n_image or n_row, index is not None)))
    return None if len({w for _, w in groups}) <= 1 else groups


def _attend(kernel: Kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: list) -> torch.Tensor:
    """kernel(q, k, v) for rows with weights[i] = [(keys, w)] per part or None: log(w) on those keys as the
    kernel's mask, [rows, 1, 1, keys], in chunks of BIAS_QUERY_CHUNK queries; no mask when all are None."""
    if all(w is None for w in weights):
        return kernel(q, k, v)
    bias = torch.stack([
        k.new_zeros(k.shape[1]) if groups is None else
        torch.cat([torch.full((n,), math.log(w), dtype=k.dtype, device=k.device) for n, w in groups])
        for groups in weights])[:, None, None]
    out = q.new_empty(q.shape[:2] + v.shape[2:])
    for start in range(0, q.shape[1], BIAS_QUERY_CHUNK):
        chunk = slice(start, start + BIAS_QUERY_CHUNK)
        out[:, chunk] = kernel(q[:, chunk], k, v, mask=bias)
    return out


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


def _joint(row: int, parts: list, image: tuple[int, int], n: int, device) -> list:
    """Parts of a joint-attention row (text and image tokens in one sequence).

    A whole ref is the whole row, text included, so [geo; tar] with tar == geo duplicates every key and is
    plain attention again, as in a UNet. A region ref names image tokens (region indices count image tokens,
    so they shift by the image span's start). A rule without the row's own whole ref still keeps its own
    non-image tokens (its text)."""
    start, stop = image
    out = [] if (row, None) in parts else [(row, torch.cat([torch.arange(0, start, device=device),
                                                             torch.arange(stop, n, device=device)]))]
    return out + [(r, None if index is None else index.to(device) + start) for r, index in parts]


def effective(refs: Sequence[Refs], regions: Optional[Mapping[int, torch.Tensor]] = None) -> bool:
    """Whether any row's rule differs from plain self-attention (else shared_attention is the kernel itself)."""
    return any(_resolve(r, refs[r], regions or {}) is not None for r in range(len(refs)))


def _span(rows: list[int]):
    """rows as a slice when they are consecutive (indexing with it is a view: no copy), else the list."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return rows


@functools.lru_cache(maxsize=256)
def _index(rows: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """rows as an index tensor on `device`, made once: indexing a CUDA tensor with a Python list copies the
    list from pageable host memory on every call, which waits for the GPU's queue (a sync per layer)."""
    return torch.tensor(rows, dtype=torch.long, device=device)


def _rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    span = _span(rows)
    return t[span] if isinstance(span, slice) else t.index_select(0, _index(tuple(rows), t.device))


def _put(out: torch.Tensor, rows: list[int], value: torch.Tensor) -> None:
    """out[rows] = value, without a host-to-device copy of the row list (see _index)."""
    span = _span(rows)
    if isinstance(span, slice):
        out[span] = value
    else:
        out.index_copy_(0, _index(tuple(rows), out.device), value)


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
    report: Optional[Callable[[int, list[tuple[int, float]]], None]] = None,
    image: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """Attention where row r's keys/values are those named by refs[r].

    q: [R, N, C]; k, v: [R + E, N, C], rows R.. being reference-only rows (no query, e.g. recorded in
    another pass: trajectory.py); refs: one entry per row of q; regions: row -> its region's tokens, as a bool [N]
    mask or an index tensor (only rows referenced with region_only need one). `kernel` computes plain rows; `ref_kernel` (default:
    kernel) the rows with a rule. `base`, when given, is the plain output of the whole batch already
    computed (by another patch being chained): plain rows take it as is. When no row has an
    effective rule, the result is exactly kernel(q, k, v) (or `base`). Refs with a `balance` add
    log(w) to their keys' logits (see Balance); `report(row, [(keys, w) per group])` is told the
    weights of every row that got a bias.

    `image` = (start, stop): joint attention (a DiT's text and image tokens in one sequence): region
    masks index the image tokens [start, stop), a whole ref is the whole row, and each row with a rule
    keeps its own other tokens (see _joint). Only dims 0 (rows) and 1 (tokens) are indexed, so
    q, k, v may also be [R, N, heads, dim_head].
    """
    if len(refs) != q.shape[0]:
        raise ValueError(f"{len(refs)} attention rules for a batch of {q.shape[0]} rows")
    resolved = [_resolve(r, refs[r], regions or {}) for r in range(q.shape[0])]
    if all(parts is None for parts in resolved):
        return kernel(q, k[: q.shape[0]], v[: q.shape[0]]) if base is None else base
    if image is not None:
        resolved = [None if parts is None else _joint(r, parts, image, k.shape[1], k.device)
                    for r, parts in enumerate(resolved)]

    ref_kernel = ref_kernel or kernel
    plain = [r for r, parts in enumerate(resolved) if parts is None]
    if base is not None:
        out = base.clone()
    else:
        out = q.new_empty(q.shape[:2] + v.shape[2:])
        if plain:
            _put(out, plain, kernel(_rows(q, plain), _rows(k, plain), _rows(v, plain)))
    # rows whose key sets have the same length run as one batched kernel call
    groups: dict[int, list[int]] = {}
    for r, parts in enumerate(resolved):
        if parts is not None:
            length = sum(k.shape[1] if index is None else index.numel() for _, index in parts)
            groups.setdefault(length, []).append(r)
    n_image = None if image is None else image[1] - image[0]
    weights = [_weights(refs[r], parts, k.shape[1], n_image) for r, parts in enumerate(resolved)]
    for keys, rows in groups.items():
        k_cat = _gather(k, rows, resolved, keys)  # [len(rows), keys, C]
        v_cat = _gather(v, rows, resolved, keys)
        _put(out, rows, _attend(ref_kernel, _rows(q, rows), k_cat, v_cat, [weights[r] for r in rows]))
    for r, groups_of_r in enumerate(weights):
        if report is not None and groups_of_r is not None:
            report(r, groups_of_r)
    return out


def reference_attention(q, k, v, heads: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Naive softmax(q k^T / sqrt(d) + bias) v in float64 with the explicit map: the tests' ground truth.
    bias: additive logits broadcastable to [B, heads, N, keys] (e.g. [keys] or [B, 1, 1, keys])."""
    b, n, c = q.shape
    d = c // heads
    qh, kh, vh = (t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2).double() for t in (q, k, v))
    logits = qh @ kh.transpose(-1, -2) / d ** 0.5
    if bias is not None:
        logits = logits + bias.double()
    weights = torch.softmax(logits, dim=-1)
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
