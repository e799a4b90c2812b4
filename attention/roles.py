"""Batch roles: which row is source / target / geometry / output, and whom each row attends to.

A geometry-transfer batch holds P targets (pairs), each receiving G geometries (G = 1: the paper), and
S source rows: one per geometry shared by every pair (S = G) or one per geometry and pair (S = G * P):

    inversion rows:  [src_0 .. src_S-1, tar_0 .. tar_P-1, geo_0 .. geo_P-1]
    generation rows: [src_0 .. src_S-1, out_0 .. out_P-1]

Source rows are pair-major: row p * G + g is pair p's geometry g (row g when shared). A geometry row
holds all G patches of its pair composited on its target (later geometries on top), and its region
mask is their union; each source row's region is its own source mask. So however many geometries,
there is one inversion and one generation, with G - 1 more rows than one geometry needs:
- Texture-aligning (eq. 3), unchanged:  geo_p -> [geo_p; tar_p]
- Geometry-preserving (eq. 5):          out_p -> [out_p; src_(p,0) in M_src_0; ...; src_(p,G-1) in M_src_G-1]

A `RowPlan` is what the attention patch consults at every self-attention layer: the rule of each
row (see kv.Ref) given the layer, and each row's region tokens at the layer's resolution.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from typing import Optional
from collections.abc import Callable, Sequence

import torch

from .kv import Balance, Kernel, Program, Ref, Refs, contrast_attention
from .tokens import region_tokens
from .trajectory import Replayer, Trajectory

TEXTURE_ALIGNING_MODES = ("texture_aligning", "geometry_only", "target_only")
GEOMETRY_PRESERVING_MODES = ("geometry_preserving", "self_only", "source_only")
BALANCE_MODES = ("paper", "auto", "manual")


def balance(mode: str = "paper", weight: float = 1.0) -> Optional[Balance]:
    """The Balance of a node's (mode, weight); None where it is the paper's w = 1 (no bias at all)."""
    if mode not in BALANCE_MODES:
        raise ValueError(f"balance mode {mode!r}: choose one of {BALANCE_MODES}")
    if not (weight > 0 and weight < float("inf")):
        raise ValueError(f"balance weight must be > 0, got {weight}: 1 is neutral, 2 doubles the reference's mass")
    if mode == "paper" or (mode == "manual" and weight == 1.0):
        return None
    return Balance(weight, auto=mode == "auto")


@dataclass(frozen=True)
class Layer:
    """Where a self-attention call happens, in host-agnostic terms."""

    stage: str  # "input" (encoder), "middle" or "output" (decoder)
    downscale: int  # latent width / layer width: 1, 2, 4, ...
    step: Optional[float] = None  # position in the sampling schedule, 0 (first step) .. 1 (last)


@dataclass
class RowPlan:
    """Rules per batch row given the layer, and what the rules need.

    regions: per-row region masks ([rows, H, W], any resolution) for region_only refs;
    needs_step: the rules read Layer.step (the host then works out the schedule position);
    contrast: beta of cross-image attention's contrast for the rows with a rule (1 = none);
    contrast_clip: clamp the contrasted weights to [0, 1] (the official code's variant);
    report_balance: record the balance weights each layer applied (balance_report()).
    record: store every layer call's keys/values of the rows at their region tokens (see trajectory.py);
    replay: hand recorded rows to every layer call as reference-only rows: a rule's Ref(rows + s) names
    recorded row s (its region tokens only, whatever region_only says).
    The host resolves what depends on data (the schedule position, the Programs, the recorded rows) once per
    model call, outside the layers (nodes/patch.py).
    """

    rows: int
    rules: Callable[[Layer], Sequence[Refs]]
    regions: Optional[torch.Tensor] = None
    needs_step: bool = False
    contrast: float = 1.0
    contrast_clip: bool = False
    report_balance: bool = False
    record: Optional[Trajectory] = None
    replay: Optional[Replayer] = None
    _tokens: dict = field(default_factory=dict, repr=False)
    _programs: dict = field(default_factory=dict, repr=False)
    _balance_seen: dict = field(default_factory=dict, repr=False)

    def ref_kernel(self, heads: int) -> Optional[Kernel]:
        """The kernel of the rows with a rule: None (the host's) unless contrast is on."""
        if self.contrast == 1.0:
            return None
        return partial(contrast_attention, heads=heads, beta=self.contrast, clip=self.contrast_clip)

    def region_tokens(self, h: int, w: int, device=None) -> dict[int, torch.Tensor]:
        """Row -> indices of its region's tokens in an (h, w) layer, computed once per size and device."""
        if self.regions is None:
            return {}
        key = (h, w, str(device))
        if key not in self._tokens:
            masks = region_tokens(self.regions, h, w)
            self._tokens[key] = {row: m.nonzero().squeeze(1).to(device) for row, m in enumerate(masks)}
        return self._tokens[key]

    def record_index(self, h: int, w: int, chunks: int, device) -> tuple[torch.Tensor, tuple[int, ...]]:
        """(index [chunks * rows, longest region], each row's region length) of an (h, w) layer, for a recording:
        k.gather(1, index) takes every row's region tokens first (the rest of a shorter row is padding)."""
        key = ("record", h, w, chunks, str(device))
        if key not in self._tokens:
            tokens = self.region_tokens(h, w, device)
            lengths = tuple(int(tokens[r].numel()) for r in range(self.rows))
            index = torch.zeros(self.rows, max(lengths, default=0), dtype=torch.long, device=device)
            for r, n in enumerate(lengths):
                index[r, :n] = tokens[r]
            self._tokens[key] = (index.repeat(chunks, 1), lengths)
        return self._tokens[key]

    def program(self, layer: Layer, h: int, w: int, chunks: int, device, joint: bool = False,
                recorded: tuple[tuple[int, ...], ...] = ()) -> Program:
        """The kv.Program of one attention call at an (h, w) layer, built once per layout: a batch of `chunks`
        cond/uncond chunks of this plan's rows (chunk c's rules shifted to its rows), `joint` for a joint attention
        of text and image tokens (kv.shared_attention's image). recorded: per chunk, the region lengths of the
        recorded rows a replay hands over as reference-only rows (chunk c's S rows from chunks * rows + c * S on);
        a rule's Ref(rows + s) names recorded row s of its own chunk, its region tokens only."""
        rules = tuple(self.rules(layer))
        key = (rules, h, w, chunks, str(device), joint, recorded)
        program = self._programs.get(key)
        if program is None:
            rows, first = self.rows, chunks * self.rows
            regions = {c * rows + j: t for c in range(chunks) for j, t in self.region_tokens(h, w, device).items()}
            for c, lengths in enumerate(recorded):
                for s, n in enumerate(lengths):
                    regions[first + c * len(lengths) + s] = slice(0, n)
            per_chunk = [_shift(rules[j], c * rows, rows if recorded else None,
                                first + c * len(recorded[c]) if recorded else 0)
                         for c in range(chunks) for j in range(rows)]
            program = self._programs[key] = Program(per_chunk, regions, h * w, device, joint)
        return program

    def balance_recorder(self, stage: str, h: int, w: int):
        """kv.Program's `report` for one layer call (None unless report_balance)."""
        if not self.report_balance:
            return None

        def record(row: int, groups: list[tuple[int, float]]):
            self._balance_seen[(stage, h, w, row % self.rows)] = tuple(groups)

        return record

    def balance_report(self) -> list[str]:
        """One line per (layer, row) that got a balance: keys, weight and share at equal logits per group."""
        lines = []
        for (stage, h, w, row), groups in sorted(self._balance_seen.items()):
            total = sum(n * wt for n, wt in groups)
            parts = ", ".join(f"{n} keys w={wt:.3g} ({100 * n * wt / total:.1f}%)" for n, wt in groups)
            lines.append(f"{stage} {w}x{h} row {row}: {parts}")
        return lines


def _shift(refs: Refs, offset: int, rows: Optional[int] = None, recorded: int = 0) -> Refs:
    """refs of a chunk's row, shifted by `offset`; refs to recorded rows (row >= rows) moved to `recorded` on."""
    if refs is None:
        return None
    return tuple(dataclasses.replace(r, row=r.row + offset) if rows is None or r.row < rows
                 else dataclasses.replace(r, row=recorded + r.row - rows, region_only=True) for r in refs)


@dataclass(frozen=True)
class PairLayout:
    sources: int
    pairs: int
    geometries: int = 1

    def __post_init__(self):
        if self.geometries == 1 and self.sources not in (1, self.pairs):
            raise ValueError(f"{self.sources} sources for {self.pairs} pairs: give one source, or one per target")
        if self.sources not in (self.geometries, self.geometries * self.pairs):
            raise ValueError(f"{self.sources} source rows for {self.pairs} targets with {self.geometries} geometries "
                             "each: give one source per geometry, or one per geometry and target")

    def sources_of(self, pair: int) -> list[int]:
        """Source rows of a pair's geometries, in geometry order."""
        first = pair * self.geometries if self.sources > self.geometries else 0
        return list(range(first, first + self.geometries))

    # row indices
    def src(self, i: int) -> int:
        return i

    def tar(self, pair: int) -> int:
        return self.sources + pair

    def geo(self, pair: int) -> int:
        return self.sources + self.pairs + pair

    out = tar  # generation rows: [src..., out...]

    @property
    def inversion_rows(self) -> int:
        return self.sources + 2 * self.pairs

    @property
    def generation_rows(self) -> int:
        return self.sources + self.pairs


def texture_aligning_rules(layout: PairLayout, mode: str = "texture_aligning",
                           balance: Optional[Balance] = None) -> list[Refs]:
    """Eq. 3 for the geometry rows; source and target rows keep plain self-attention.
    `balance` weighs the target's keys (the whole target row: auto gives w = 1 here, see Balance)."""
    if mode not in TEXTURE_ALIGNING_MODES:
        raise ValueError(f"texture-aligning mode {mode!r}: choose one of {TEXTURE_ALIGNING_MODES}")
    rules: list[Refs] = [None] * layout.inversion_rows
    for p in range(layout.pairs):
        geo, tar = layout.geo(p), layout.tar(p)
        rules[geo] = {
            "texture_aligning": (Ref(geo), Ref(tar, balance=balance)),
            "geometry_only": None,
            "target_only": (Ref(tar),),
        }[mode]
    return rules


def geometry_preserving_rules(layout: PairLayout, mode: str = "geometry_preserving",
                              balance: Optional[Balance] = None) -> list[Refs]:
    """Eqs. 5-7 for the output rows: also attend to every source's tokens inside its source mask.
    `balance` weighs each source's group on its own (auto: each as if of canonical size)."""
    if mode not in GEOMETRY_PRESERVING_MODES:
        raise ValueError(f"geometry-preserving mode {mode!r}: choose one of {GEOMETRY_PRESERVING_MODES}")
    rules: list[Refs] = [None] * layout.generation_rows
    for p in range(layout.pairs):
        out = layout.out(p)
        sources = tuple(Ref(layout.src(s), region_only=True, balance=balance) for s in layout.sources_of(p))
        rules[out] = {
            "geometry_preserving": (Ref(out), *sources),
            "self_only": None,
            "source_only": sources,  # one geometry: a single group, so the balance cancels
        }[mode]
    return rules
