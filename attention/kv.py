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


# A part of a resolved rule: (row, kind, tokens). kind "whole": every token of the row; "before" / "after": a joint
# row's own tokens before / after the image span (its text); "region": the tokens `tokens` names (an index tensor, or
# a slice for a prefix of a reference-only row's tokens).
Part = tuple[int, str, object]


def _size(tokens) -> int:
    """How many tokens an index tensor or a prefix slice names."""
    return tokens.stop - tokens.start if isinstance(tokens, slice) else tokens.numel()


def _resolve(row: int, refs: Refs, regions: Mapping[int, object]) -> Optional[list[Part]]:
    """The parts of row's rule, or None where it reduces to plain self-attention (regions: index tensors or slices)."""
    if refs is None:
        return None
    parts = []
    for ref in refs:
        if ref.region_only:
            tokens = regions[ref.row]
            if _size(tokens) == 0:
                continue  # an empty region contributes no keys
            parts.append((ref.row, "region", tokens))
        else:
            parts.append((ref.row, "whole", None))
    if not parts or parts == [(row, "whole", None)]:
        return None
    return parts


def _joint(row: int, parts: list[Part]) -> list[Part]:
    """Parts of a joint-attention row (text and image tokens in one sequence).

    A whole ref is the whole row, text included, so [geo; tar] with tar == geo duplicates every key and is
    plain attention again, as in a UNet. A region ref names image tokens. A rule without the row's own whole ref
    still keeps its own non-image tokens (its text: the spans before and after the image)."""
    if (row, "whole", None) in parts:
        return parts
    return [(row, "before", None), (row, "after", None), *parts]


def _weights(refs: Refs, parts: list[Part], n_image: int) -> Optional[list[float]]:
    """w per part of a resolved rule (kv.Balance), None where no ref has a balance. n_image: the tokens a region
    mask indexes (a row's image tokens), the canonical base of an auto balance."""
    if all(ref.balance is None for ref in refs):
        return None
    balance = {(ref.row, ref.region_only): ref.balance for ref in refs}
    weights = []
    for row, kind, tokens in parts:
        b = balance.get((row, kind == "region")) if kind in ("whole", "region") else None  # own text: weight 1
        weights.append(1.0 if b is None else b.factor(_size(tokens) if kind == "region" else n_image, n_image,
                                                      kind == "region"))
    return weights


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


def _select(rows: list[int], device) -> slice | torch.Tensor:
    """rows as a slice when consecutive (indexing with it is a view: no copy), else an index tensor on `device`
    (made once, with the Program: indexing a CUDA tensor with a Python list copies the list from host memory on
    every call, a sync per layer)."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(rows, dtype=torch.long, device=device)


def _take(t: torch.Tensor, rows: slice | torch.Tensor) -> torch.Tensor:
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def _put(out: torch.Tensor, rows: slice | torch.Tensor, value: torch.Tensor) -> None:
    if isinstance(rows, slice):
        out[rows] = value
    else:
        out.index_copy_(0, rows, value)


def _span(t: torch.Tensor, kind: str, tokens, start: int, stop: int, reference: bool) -> torch.Tensor:
    """The tokens of a part from rows t [rows, N, ...] (views for whole rows, text spans and slices). A batch row's
    region indices count from the image span's start; a reference-only row's index its own tokens."""
    if kind == "whole":
        return t
    if kind == "before":
        return t[:, :start]
    if kind == "after":
        return t[:, stop:]
    if isinstance(tokens, slice):
        return t[:, tokens]
    if not reference and (start, stop) != (0, t.shape[1]):
        t = t[:, start:stop]
    return t.index_select(1, tokens)


@dataclass
class _Part:
    """One stretch of a group's key buffer: for each row of the group, part j of its rule. `rows` names the row
    each group row takes it from (slice or index tensor; of the reference-only rows when `reference`), all with the
    same `tokens`; one row shared by the whole group is taken once and expanded. Where the group's rows take
    different tokens (regions of one size), `per_row` lists (row, tokens)."""

    kind: str
    reference: bool
    rows: slice | torch.Tensor | None
    tokens: object
    expand: bool = False
    per_row: Optional[list] = None

    def size(self, n: int, start: int, stop: int, n_reference: int) -> int:
        """Its tokens per row in a call whose rows have n tokens (image span [start, stop)) and whose reference-only
        rows n_reference."""
        if self.kind == "whole":
            return n_reference if self.reference else n
        if self.kind == "before":
            return start
        if self.kind == "after":
            return n - stop
        return _size(self.tokens if self.per_row is None else self.per_row[0][1])

    def take(self, t: torch.Tensor, reference: Optional[torch.Tensor], start: int, stop: int,
             count: int) -> torch.Tensor:
        """[count, size, ...]: this part of every group row."""
        source = reference if self.reference else t
        if self.per_row is not None:
            return torch.cat([_span(source[r], self.kind, tokens, start, stop, self.reference)
                              for r, tokens in self.per_row])
        part = _span(_take(source, self.rows), self.kind, self.tokens, start, stop, self.reference)
        return part.expand(count, *part.shape[1:]) if self.expand else part


def _same(a, b) -> bool:
    return a is b or (isinstance(a, slice) and a == b)


class _Group:
    """Rows whose rules have the same parts in the same order, each of one size: one batched kernel call on key
    buffers made by concatenating the parts along the tokens. `weights`: per row, w per part (None: no balance)."""

    def __init__(self, rows: list[int], resolved: list[list[Part]], weights: list, batch: int, device):
        self.ids = rows
        self.rows = _select(rows, device)
        self.count = len(rows)
        self.weights = None if all(w is None for w in weights) else weights
        self.parts = []
        for j in range(len(resolved[0])):
            entries = [parts[j] for parts in resolved]
            kind, reference = entries[0][1], entries[0][0] >= batch
            sources = [row - batch if reference else row for row, _, _ in entries]
            tokens = [t for _, _, t in entries]
            if all(_same(t, tokens[0]) for t in tokens):
                if len(set(sources)) == 1:
                    self.parts.append(_Part(kind, reference, slice(sources[0], sources[0] + 1), tokens[0],
                                            expand=self.count > 1))
                else:
                    self.parts.append(_Part(kind, reference, _select(sources, device), tokens[0]))
            else:
                self.parts.append(_Part(kind, reference, None, None,
                                        per_row=[(slice(s, s + 1), t) for s, t in zip(sources, tokens, strict=True)]))

    def gather(self, t: torch.Tensor, reference: Optional[torch.Tensor], keep: list[int], start: int,
               stop: int) -> torch.Tensor:
        """[count, keys, ...]: each row's parts (the non-empty ones, `keep`) concatenated along the tokens."""
        return torch.cat([self.parts[j].take(t, reference, start, stop, self.count) for j in keep], dim=1)


def _on_device(regions: Optional[Mapping[int, object]], device) -> dict[int, object]:
    """Row -> its region's tokens as an index tensor on `device` (from a bool mask or an index tensor; rows sharing
    one tensor share the result) or as given (a prefix slice)."""
    made: dict[int, object] = {}

    def index(t):
        if isinstance(t, slice):
            return t
        if id(t) not in made:
            made[id(t)] = (t.nonzero().squeeze(1) if t.dtype == torch.bool else t).to(device)
        return made[id(t)]

    return {row: index(t) for row, t in (regions or {}).items()}


class Program:
    """The rules of one attention layout resolved once: which rows run plain, which rows share a kernel call
    (rules with the same parts of the same sizes), which rows and tokens each part of their key buffers takes,
    and their balance weights.

    refs: one rule per query row; rows from len(refs) on are reference-only rows (no query: `ref_k` / `ref_v` of
    the call, e.g. recorded in another pass: trajectory.py). regions: row -> its region's tokens (bool [N] mask,
    index tensor, or a prefix slice of a reference-only row); a batch row's regions index its image tokens.
    n_image: the tokens a region mask indexes (an auto balance's canonical base). joint: rows also hold text
    around their image span (see shared_attention).

    Nothing here depends on the number of tokens per row or on where the image span lies: a call takes them from
    its tensors' shapes, so one Program serves every layer of its resolution, a diffusion transformer's blocks
    whatever their text length, and under torch.compile every size is a constant of the traced call. The index
    tensors are made on `device` here, so a call launches only its copies and kernels: no host-to-device copy, no
    sync. A caller that meets the same layout at every layer and step keeps its Program (RowPlan.program does)."""

    def __init__(self, refs: Sequence[Refs], regions: Optional[Mapping[int, object]], n_image: int, device,
                 joint: bool = False):
        regions = _on_device(regions, device)
        self.rows = len(refs)
        resolved = [_resolve(r, refs[r], regions) for r in range(self.rows)]
        self.effective = any(parts is not None for parts in resolved)
        if joint:
            resolved = [None if parts is None else _joint(r, parts) for r, parts in enumerate(resolved)]
        plain = [r for r, parts in enumerate(resolved) if parts is None]
        self.plain = _select(plain, device) if plain else None
        self.plain_rows = len(plain)
        by_layout: dict[tuple, list[int]] = {}
        for r, parts in enumerate(resolved):
            if parts is not None:
                layout = tuple((kind, row >= self.rows, _size(t) if kind == "region" else None) for row, kind, t in parts)
                by_layout.setdefault(layout, []).append(r)
        self.groups = [_Group(rows, [resolved[r] for r in rows], [_weights(refs[r], resolved[r], n_image) for r in rows],
                              self.rows, device) for rows in by_layout.values()]
        self._shapes: dict[tuple, list] = {}

    def _shape(self, n: int, start: int, stop: int, n_reference: int, dtype, device) -> list:
        """Per group: (indices of its non-empty parts, bias [count, 1, 1, keys] or None, [(row, [(keys, w)])] of the
        rows with a balance). Kept per call shape, except while torch.compile traces (the sizes are then constants
        of the traced graph, and the bias one of its ops)."""
        key = (n, start, stop, n_reference, dtype, device)
        shape = None if torch.compiler.is_compiling() else self._shapes.get(key)
        if shape is not None:
            return shape
        shape = []
        for group in self.groups:
            sizes = [part.size(n, start, stop, n_reference) for part in group.parts]
            keep = [j for j, s in enumerate(sizes) if s > 0]
            bias, reports = None, []
            if group.weights is not None:
                rows = []
                for r, weights in zip(group.ids, group.weights, strict=True):
                    groups = None if weights is None else [(sizes[j], weights[j]) for j in keep]
                    if groups is not None and len({w for _, w in groups}) > 1:  # equal weights: the softmax is unchanged
                        reports.append((r, groups))
                        rows.append(torch.cat([torch.full((s,), math.log(w), dtype=dtype, device=device)
                                               for s, w in groups]))
                    else:
                        rows.append(torch.zeros(sum(sizes), dtype=dtype, device=device))
                if reports:
                    bias = torch.stack(rows)[:, None, None]
            shape.append((keep, bias, reports))
        if not torch.compiler.is_compiling():
            self._shapes[key] = shape
        return shape

    def keys(self, tokens: int, image: Optional[tuple[int, int]] = None) -> int:
        """Keys over all rows (for FLOP counts) of a call with `tokens` per row: plain rows `tokens` each."""
        start, stop = image or (0, tokens)
        return self.plain_rows * tokens + sum(g.count * sum(p.size(tokens, start, stop, 0) for p in g.parts)
                                              for g in self.groups)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: Kernel,
                 ref_kernel: Optional[Kernel] = None, base: Optional[torch.Tensor] = None,
                 report: Optional[Callable[[int, list[tuple[int, float]]], None]] = None,
                 image: Optional[tuple[int, int]] = None, ref_k: Optional[torch.Tensor] = None,
                 ref_v: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q, k, v: [rows, N, ...] (dims 0 and 1 are indexed only); image: a joint attention's image span;
        ref_k, ref_v: [E, M, ...], the reference-only rows."""
        if q.shape[0] != self.rows:
            raise ValueError(f"{self.rows} attention rules for a batch of {q.shape[0]} rows")
        if not self.effective:
            return kernel(q, k, v) if base is None else base
        n = k.shape[1]
        start, stop = image if image is not None else (0, n)
        shape = self._shape(n, start, stop, 0 if ref_k is None else ref_k.shape[1], q.dtype, q.device)
        if base is not None:
            out = base.clone()
        else:
            out = q.new_empty(q.shape[:2] + v.shape[2:])
            if self.plain is not None:
                _put(out, self.plain, kernel(_take(q, self.plain), _take(k, self.plain), _take(v, self.plain)))
        for group, (keep, bias, reports) in zip(self.groups, shape, strict=True):
            _put(out, group.rows, _attend(ref_kernel or kernel, _take(q, group.rows), group.gather(k, ref_k, keep, start, stop),
                                          group.gather(v, ref_v, keep, start, stop), bias))
            if report is not None:
                for r, groups in reports:
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
    mask or an index tensor (only rows referenced with region_only need one; a reference-only row's index its own
    tokens). `kernel` computes plain rows; `ref_kernel` (default:
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
    rows = q.shape[0]
    extra = k.shape[0] > rows
    program = Program(refs, regions, k.shape[1] if image is None else image[1] - image[0], k.device, image is not None)
    return program(q, k[:rows], v[:rows], kernel, ref_kernel, base, report, image,
                   k[rows:] if extra else None, v[rows:] if extra else None)


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
