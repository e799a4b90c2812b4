"""Placements that keep the whole moved mask inside a target region (where a defect may land).

The moved mask is the one edit.place_source draws (binarize(T(M_src))); for a given scale and rotation, an
integer change of shift translates it by whole pixels, so the shifts that keep it inside the region are the
erosion of the region by the moved mask, computed as one FFT correlation. Each candidate is then checked with
place_source itself (the exact mask the pipeline will use). Masks are [H,W] with 1 = region.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import edit


def moved_mask(source_mask: Tensor, target_hw: tuple[int, int], placement: edit.Placement) -> Tensor:
    """[Ht,Wt] bool: M_geo of `placement` on a target canvas of `target_hw` (H, W)."""
    src = edit.binarize(source_mask.float())
    canvas = torch.zeros(1, *target_hw, 1, dtype=src.dtype, device=src.device)
    _, geo_mask = edit.place_source(src[None, ..., None], src[None], canvas, placement)
    return geo_mask[0] > 0


def fits(source_mask: Tensor, region: Tensor, placement: edit.Placement, area: int) -> bool:
    """Whether the whole moved mask lies inside the binarized region (the canvas is the region's size): none of
    its pixels outside, and all `area` of them on the canvas (the canvas edge clips a mask that crosses it)."""
    try:
        moved = moved_mask(source_mask, tuple(region.shape), placement)
    except ValueError:  # off the canvas
        return False
    return int(moved.sum()) == area and bool(not (moved & ~(edit.binarize(region.float()) > 0)).any())


def candidate_shifts(source_mask: Tensor, region: Tensor, scale: float = 1.0,
                     rotation: float = 0.0) -> tuple[edit.Placement, Tensor, int]:
    """(base placement, [N,2] integer (dx, dy) offsets, area): base shifted by any offset keeps the moved mask
    (`area` pixels) inside the region, up to the rounding of the warp, which `fits` checks. N = 0: the region
    cannot hold the mask."""
    if region.dim() != 2 or source_mask.dim() != 2:
        raise ValueError(f"masks must be [H,W], got {tuple(source_mask.shape)} and {tuple(region.shape)}")
    inside = edit.binarize(region.float()) > 0
    h, w = inside.shape
    if not inside.any():
        raise ValueError(f"the target region ({w}x{h}) is empty: paint where the geometry may land")
    base = edit.Placement(scale=scale, rotation=rotation)
    moved = moved_mask(source_mask, (h, w), base)
    if _touches_border(moved):  # may be clipped by the canvas: centre it, so translations see all of it
        ys, xs = torch.nonzero(moved, as_tuple=True)
        dx = round((w - 1) / 2 - (xs.min().item() + xs.max().item()) / 2)
        dy = round((h - 1) / 2 - (ys.min().item() + ys.max().item()) / 2)
        base = edit.Placement(shift_x=float(dx), shift_y=float(dy), scale=scale, rotation=rotation)
        moved = moved_mask(source_mask, (h, w), base)
        if _touches_border(moved):
            ys, xs = torch.nonzero(moved, as_tuple=True)
            raise ValueError(
                f"at scale {scale:g} and rotation {rotation:g} the moved mask spans at least "
                f"{int(xs.max() - xs.min()) + 1}x{int(ys.max() - ys.min()) + 1} px, as large as the {w}x{h} target: "
                "lower the scale")
    return base, _erosion_offsets(moved, inside), int(moved.sum())


def _touches_border(mask: Tensor) -> bool:
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def _erosion_offsets(moved: Tensor, inside: Tensor) -> Tensor:
    """[N,2] (dx, dy), in row-major order of (dy, dx): the translations t with moved + t inside `inside`."""
    h, w = inside.shape
    size = (2 * h, 2 * w)  # zero padding: no wrap-around for |t| < (h, w)
    m = torch.fft.rfft2(moved.double(), s=size)
    r = torch.fft.rfft2(inside.double(), s=size)
    # hits[t] = sum_p moved[p] * inside[p + t]: the cross-correlation, at cyclic index t
    hits = torch.fft.irfft2(m.conj() * r, s=size).round()
    full = hits >= moved.sum().double()
    # offsets -(h-1)..(h-1): cyclic indices 0..h-1 then 2h-(h-1)..2h-1
    dy = torch.cat([torch.arange(-(h - 1), 0), torch.arange(0, h)])
    dx = torch.cat([torch.arange(-(w - 1), 0), torch.arange(0, w)])
    valid = full[dy % size[0]][:, dx % size[1]]
    ys, xs = torch.nonzero(valid, as_tuple=True)
    return torch.stack([dx[xs], dy[ys]], dim=1)
