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
    """[(keys, w)] per part of a resolved rule ([(row, tokens)]: None for the whole row, an index tensor for a region,
    a slice for a joint row's own text); None when every w is equal
    (the softmax is then unchanged: no bias). n_row: tokens of a whole row; n_image: the tokens a region mask
    indexes, a region's canonical base for auto (default n_row; fewer where a row also holds text tokens)."""
    if parts is None or all(ref.balance is None for ref in refs):
        return None
    balance = {(ref.row, ref.region_only): ref.balance for ref in refs}
    groups = []
    for row, tokens in parts:
        n = n_row if tokens is None else _count(tokens, n_row)
        region = isinstance(tokens, torch.Tensor)
        b = balance.get((row, region))
        groups.append((n, 1.0 if b is None else b.factor(n, n_image or n_row, region)))
    return None if len({w for _, w in groups}) <= 1 else groups


def _attend(kernel: Kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            bias: Optional[torch.Tensor]) -> torch.Tensor:
    """kernel(q, k, v), or with `bias` ([rows, 1, 1, keys] additive logits) as the kernel's mask, in chunks of
    BIAS_QUERY_CHUNK queries."""
    if bias is None:
        return kernel(q, k, v)
    out = q.new_empty(q.shape[:2] + v.shape[2:])
    for start in range(0, q.shape[1], BIAS_QUERY_CHUNK):
        chunk = slice(start, start + BIAS_QUERY_CHUNK)
        out[:, chunk] = kernel(q[:, chunk], k, v, mask=bias)
    return out


def _bias(weights: list, keys: int, dtype, device) -> Optional[torch.Tensor]:
    """[rows, 1, 1, keys]: log(w) on each group's keys, for rows with weights[i] = [(keys, w)] per part or None;
    None when every row's is None (the kernel then gets no mask at all)."""
    if all(w is None for w in weights):
        return None
    return torch.stack([
        torch.zeros(keys, dtype=dtype, device=device) if groups is None else
        torch.cat([torch.full((n,), math.log(w), dtype=dtype, device=device) for n, w in groups])
        for groups in weights])[:, None, None]


def _resolve(row: int, refs: Refs, regions: Mapping[int, torch.Tensor]) -> Optional[list]:
    """[(row, token index or None)], or None where the rule reduces to plain self-attention (regions: index tensors)."""
    if refs is None:
        return None
    parts = []
    for ref in refs:
        if ref.region_only:
            index = regions[ref.row]
            if index.numel() == 0:
                continue  # an empty region contributes no keys
            parts.append((ref.row, index))
        else:
            parts.append((ref.row, None))
    if not parts or parts == [(row, None)]:
        return None
    return parts


def _joint(row: int, parts: list, image: tuple[int, int], n: int) -> list:
    """Parts of a joint-attention row (text and image tokens in one sequence), tokens as slices or indices.

    A whole ref is the whole row, text included, so [geo; tar] with tar == geo duplicates every key and is
    plain attention again, as in a UNet. A region ref names image tokens (its indices already shifted into the
    image span: Program). A rule without the row's own whole ref still keeps its own non-image tokens (its
    text: the spans before and after the image)."""
    start, stop = image
    own = [] if (row, None) in parts else [(row, s) for s in (slice(0, start), slice(stop, n)) if s.stop > s.start]
    return own + parts


def _select(rows: list[int], device) -> slice | torch.Tensor:
    """rows as a slice when consecutive (indexing with it is a view: no copy), else an index tensor on `device`
    (made once, with the Program: indexing a CUDA tensor with a Python list copies the list from host memory on
    every call, a sync per layer)."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(rows, dtype=torch.long, device=device)


def _count(tokens, n: int) -> int:
    """How many of a row's n tokens a slice or an index tensor names."""
    return len(range(n)[tokens]) if isinstance(tokens, slice) else tokens.numel()


def _take(t: torch.Tensor, rows: slice | torch.Tensor) -> torch.Tensor:
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def _put(out: torch.Tensor, rows: slice | torch.Tensor, value: torch.Tensor) -> None:
    if isinstance(rows, slice):
        out[rows] = value
    else:
        out.index_copy_(0, rows, value)


def _tokens(t: torch.Tensor, tokens) -> torch.Tensor:
    """t[..rows.., tokens] along dim 1 (a view for a slice)."""
    return t[:, tokens] if isinstance(tokens, slice) else t.index_select(1, tokens)


@dataclass
class _Group:
    """Rows whose key sets have one length: one batched kernel call. `copies`: (out rows, out token span, source
    rows, source tokens) per copy into the group's key buffer; `bias`: the balance's mask or None."""

    rows: slice | torch.Tensor
    count: int
    keys: int
    copies: list
    bias: Optional[torch.Tensor]

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """[count, keys, ...]: each row's parts concatenated along tokens, written once into one buffer."""
        out = t.new_empty((self.count, self.keys) + tuple(t.shape[2:]))
        for out_rows, span, rows, tokens in self.copies:
            out[out_rows, span] = _tokens(_take(t, rows), tokens)
        return out


def _copies(rows: list[int], resolved: list, n: int, device) -> tuple[int, list]:
    """(keys, copies) of a group (see _Group). A part that every row of the group has at the same place with the
    same tokens (a whole row, a text span, or one source region shared by every row) is copied for all rows at
    once; else row by row."""
    def size(tokens) -> int:
        return n if tokens is None else _count(tokens, n)

    def whole(tokens):
        return slice(0, n) if tokens is None else tokens

    layouts = {tuple(size(t) for _, t in resolved[r]) for r in rows}
    copies, start = [], 0
    if len(layouts) == 1:
        for j, length in enumerate(next(iter(layouts))):
            refs = [resolved[r][j][0] for r in rows]
            tokens = [resolved[r][j][1] for r in rows]
            span = slice(start, start + length)
            if all(t is tokens[0] or (isinstance(t, slice) and t == tokens[0]) for t in tokens):
                source = _select(refs, device) if len(set(refs)) > 1 else slice(refs[0], refs[0] + 1)
                copies.append((slice(0, len(rows)), span, source, whole(tokens[0])))
            else:
                copies += [(slice(i, i + 1), span, slice(r, r + 1), whole(t))
                           for i, (r, t) in enumerate(zip(refs, tokens, strict=True))]
            start += length
        return start, copies
    for i, r in enumerate(rows):
        start = 0
        for row, t in resolved[r]:
            copies.append((slice(i, i + 1), slice(start, start + size(t)), slice(row, row + 1), whole(t)))
            start += size(t)
    return start, copies


class Program:
    """The rules of one attention layout resolved once: which rows run plain, which rows share a kernel call
    (key sets of one length), what each copies into its key buffer, and its balance bias.

    refs: one rule per query row; regions: row -> its region's tokens (bool [N] mask or index tensor);
    tokens: N, the tokens of every row; image: (start, stop) for joint attention (see shared_attention).
    The index tensors and biases are made on `device` in `dtype` here, so a call launches only its copies and
    kernels: no host-to-device copy, no sync. A caller that meets the same layout at every layer and step
    keeps its Program (RowPlan.program does)."""

    def __init__(self, refs: Sequence[Refs], regions: Optional[Mapping[int, torch.Tensor]], tokens: int,
                 device, dtype, image: Optional[tuple[int, int]] = None):
        shift = 0 if image is None else image[0]
        indices: dict[int, torch.Tensor] = {}  # one index tensor per region tensor (rows may share a region)

        def index(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in indices:
                indices[id(t)] = (t.nonzero().squeeze(1) if t.dtype == torch.bool else t).to(device) + shift
            return indices[id(t)]

        regions = {row: index(t) for row, t in (regions or {}).items()}
        self.rows = len(refs)
        resolved = [_resolve(r, refs[r], regions) for r in range(self.rows)]
        self.effective = any(parts is not None for parts in resolved)
        if image is not None:
            resolved = [None if parts is None else _joint(r, parts, image, tokens)
                        for r, parts in enumerate(resolved)]
        plain = [r for r, parts in enumerate(resolved) if parts is None]
        self.plain = _select(plain, device) if plain else None
        self.plain_rows = len(plain)
        by_length: dict[int, list[int]] = {}
        for r, parts in enumerate(resolved):
            if parts is not None:
                length = sum(tokens if t is None else _count(t, tokens) for _, t in parts)
                by_length.setdefault(length, []).append(r)
        n_image = None if image is None else image[1] - image[0]
        weights = [_weights(refs[r], parts, tokens, n_image) for r, parts in enumerate(resolved)]
        self.reports = [(r, w) for r, w in enumerate(weights) if w is not None]
        self.groups = []
        for rows in by_length.values():
            keys, copies = _copies(rows, resolved, tokens, device)
            self.groups.append(_Group(_select(rows, device), len(rows), keys, copies,
                                      _bias([weights[r] for r in rows], keys, dtype, device)))

    def keys(self, tokens: int) -> int:
        """Keys over all rows (for FLOP counts): plain rows `tokens` each."""
        return self.plain_rows * tokens + sum(g.count * g.keys for g in self.groups)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: Kernel,
                 ref_kernel: Optional[Kernel] = None, base: Optional[torch.Tensor] = None,
                 report: Optional[Callable[[int, list[tuple[int, float]]], None]] = None) -> torch.Tensor:
        if q.shape[0] != self.rows:
            raise ValueError(f"{self.rows} attention rules for a batch of {q.shape[0]} rows")
        if not self.effective:
            return kernel(q, k[: self.rows], v[: self.rows]) if base is None else base
        if base is not None:
            out = base.clone()
        else:
            out = q.new_empty(q.shape[:2] + v.shape[2:])
            if self.plain is not None:
                _put(out, self.plain, kernel(_take(q, self.plain), _take(k, self.plain), _take(v, self.plain)))
        for group in self.groups:
            _put(out, group.rows, _attend(ref_kernel or kernel, _take(q, group.rows), group.gather(k),
                                          group.gather(v), group.bias))
        if report is not None:
            for r, groups in self.reports:
                report(r, groups)
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
    """Attention where row r's keys/values are those named by refs[r] (a Program built for this one call).

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
    return Program(refs, regions, k.shape[1], k.device, k.dtype, image)(q, k, v, kernel, ref_kernel, base, report)


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
