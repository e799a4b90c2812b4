"""Batch roles: which row is source / target / geometry / output, and whom each row attends to.

A geometry-transfer batch holds S sources (1, or one per pair) and P (source, target) pairs:

    inversion rows:  [src_0 .. src_S-1, tar_0 .. tar_P-1, geo_0 .. geo_P-1]
    generation rows: [src_0 .. src_S-1, out_0 .. out_P-1]

A `RowPlan` is what the attention patch consults at every self-attention layer: the rule of each
row (see kv.Ref) given the layer, and each row's region tokens at the layer's resolution.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Optional
from collections.abc import Callable, Sequence

import torch

from .kv import Kernel, Ref, Refs, contrast_attention
from .tokens import region_tokens
from .trajectory import Replayer, Trajectory

TEXTURE_ALIGNING_MODES = ("texture_aligning", "geometry_only", "target_only")
GEOMETRY_PRESERVING_MODES = ("geometry_preserving", "self_only", "source_only")


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
    record: store every layer call's keys/values of the rows at their region tokens (see trajectory.py);
    replay: append recorded rows to every layer call's keys/values as reference-only rows: a rule's
    Ref(rows + s) names recorded row s (its region tokens only, whatever region_only says).
    """

    rows: int
    rules: Callable[[Layer], Sequence[Refs]]
    regions: Optional[torch.Tensor] = None
    needs_step: bool = False
    contrast: float = 1.0
    contrast_clip: bool = False
    record: Optional[Trajectory] = None
    replay: Optional[Replayer] = None
    _tokens: dict = field(default_factory=dict, repr=False)

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


@dataclass(frozen=True)
class PairLayout:
    sources: int
    pairs: int

    def __post_init__(self):
        if self.sources not in (1, self.pairs):
            raise ValueError(f"{self.sources} sources for {self.pairs} pairs: give one source, or one per target")

    def source_of(self, pair: int) -> int:
        return pair if self.sources > 1 else 0

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


def texture_aligning_rules(layout: PairLayout, mode: str = "texture_aligning") -> list[Refs]:
    """Eq. 3 for the geometry rows; source and target rows keep plain self-attention."""
    if mode not in TEXTURE_ALIGNING_MODES:
        raise ValueError(f"texture-aligning mode {mode!r}: choose one of {TEXTURE_ALIGNING_MODES}")
    rules: list[Refs] = [None] * layout.inversion_rows
    for p in range(layout.pairs):
        geo, tar = layout.geo(p), layout.tar(p)
        rules[geo] = {
            "texture_aligning": (Ref(geo), Ref(tar)),
            "geometry_only": None,
            "target_only": (Ref(tar),),
        }[mode]
    return rules


def geometry_preserving_rules(layout: PairLayout, mode: str = "geometry_preserving") -> list[Refs]:
    """Eqs. 5-7 for the output rows: also attend to the source tokens inside the source mask."""
    if mode not in GEOMETRY_PRESERVING_MODES:
        raise ValueError(f"geometry-preserving mode {mode!r}: choose one of {GEOMETRY_PRESERVING_MODES}")
    rules: list[Refs] = [None] * layout.generation_rows
    for p in range(layout.pairs):
        out, src = layout.out(p), layout.src(layout.source_of(p))
        rules[out] = {
            "geometry_preserving": (Ref(out), Ref(src, region_only=True)),
            "self_only": None,
            "source_only": (Ref(src, region_only=True),),
        }[mode]
    return rules
