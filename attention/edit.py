"""Editing stage: the geometry edit T that places the masked source patch on the target canvas.

The placement convention (the one description of it; web/placement_math.js implements the same numbers for
the node's placement view, and tests/test_placement_browser.py checks the two against each other):
- Coordinates are pixel-centre coordinates: the pixel at column j, row i has its centre at (x, y) = (j, i)
  and covers [j - 0.5, j + 0.5] x [i - 0.5, i + 0.5]; x points right, y points down. Masks are binarized at 0.5.
- The anchor a is the centre of the bounding box of the source mask (`mask_anchor`).
- The anchor lands at the same relative position on the target, (a + 0.5) * target_size / source_size - 0.5,
  then moves by (shift_x, shift_y) target pixels (`_landing`). The patch keeps its pixel size: only `scale`
  resizes it.
- Scale (uniform) and rotation (degrees, counter-clockwise as seen on screen) act about the anchor:
  t = landing + scale * R (s - a), R = [[cos, sin], [-sin, cos]] (`forward`). `place_source` samples the inverse
  bilinearly and binarizes the moved mask at 0.5.

IMAGE tensors are [B,H,W,C] in [0,1]; MASK tensors are [B,H,W] (or [H,W]) with 1 = region.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Placement:
    """The affine edit T: shift in target pixels (+x right, +y down); scale (> 0, uniform) and
    rotation (degrees, counter-clockwise as seen on screen) act about the anchor."""

    shift_x: float = 0.0
    shift_y: float = 0.0
    scale: float = 1.0
    rotation: float = 0.0


def binarize(mask: Tensor) -> Tensor:
    """The pack treats every mask as binary: 1 where mask >= 0.5, else 0."""
    return (mask >= 0.5).to(mask.dtype if mask.is_floating_point() else torch.float32)


def mask_anchor(mask: Tensor) -> tuple[float, float]:
    """Centre (x, y) of the bounding box of the binarized [H,W] mask, in pixel-centre coordinates."""
    if mask.dim() != 2:
        raise ValueError(f"mask_anchor expects a single [H,W] mask, got shape {tuple(mask.shape)}")
    region = binarize(mask) > 0
    ys = torch.nonzero(region.any(dim=1)).flatten()
    xs = torch.nonzero(region.any(dim=0)).flatten()
    if ys.numel() == 0:
        h, w = mask.shape
        raise ValueError(
            f"source mask is empty (no value >= 0.5 in the {w}x{h} mask): paint the region to transfer"
        )
    return (xs[0].item() + xs[-1].item()) / 2, (ys[0].item() + ys[-1].item()) / 2


def place_source(
    source: Tensor, source_mask: Tensor, target: Tensor, placement: Placement
) -> tuple[Tensor, Tensor]:
    """Apply T to the masked source and paste it onto the target.

    Returns (geometry_image [B,Ht,Wt,C], geometry_mask [B,Ht,Wt]) with B = max of the batch sizes; each
    input has batch size 1 (broadcast) or B. The anchor (bbox centre of each source mask) lands at the same
    relative position on the target canvas, then moves by the shift; scale and rotation act about it.
    geometry_mask = binarize(T(binarize(source_mask))); geometry_image is T(source) inside it, target outside.
    """
    if not placement.scale > 0:
        raise ValueError(f"scale must be > 0, got {placement.scale}: use e.g. 0.5 to halve or 2.0 to double")
    source_mask = _batched_mask(source_mask)
    _check_image("source", source)
    _check_image("target", target)
    if source_mask.shape[1:] != source.shape[1:3]:
        raise ValueError(
            f"source mask is {_size(source_mask.shape[1:])} but the source image is "
            f"{_size(source.shape[1:3])}: resize the mask to the image "
            "(e.g. with ComfyUI's mask/image resize nodes)"
        )
    if source.shape[3] != target.shape[3]:
        raise ValueError(
            f"source image has {source.shape[3]} channels but the target has {target.shape[3]}: "
            "convert both to RGB"
        )
    b = _common_batch(source=source, source_mask=source_mask, target=target)
    source, source_mask, target = (_expand_batch(t, b) for t in (source, source_mask, target))
    h, w = source.shape[1:3]
    ht, wt = target.shape[1:3]

    # float64 keeps integer shifts and right-angle rotations exact to the pixel; MPS has no float64.
    work = torch.float32 if source.device.type == "mps" else torch.float64
    anchors = [mask_anchor(m) for m in source_mask]
    grid = torch.stack([_inverse_grid(a, (h, w), (ht, wt), placement, source.device, work) for a in anchors])

    def warp(x: Tensor) -> Tensor:  # [B,C,H,W] -> [B,C,Ht,Wt]
        return F.grid_sample(x.to(work), grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    warped = warp(source.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).to(target.dtype)
    geo_mask = binarize(warp(binarize(source_mask).unsqueeze(1))[:, 0]).to(target.dtype)

    empty = geo_mask.flatten(1).amax(dim=1) == 0
    if empty.any():
        i = int(torch.nonzero(empty)[0])
        raise ValueError(_off_canvas_message(anchors[i], (h, w), (ht, wt), placement))

    geometry = torch.where(geo_mask.unsqueeze(-1) > 0, warped, target)
    return geometry, geo_mask


def _common_batch(**tensors: Tensor) -> int:
    """The common batch size B of the named tensors, each of which must have batch size 1 or B."""
    sizes = {name: t.shape[0] for name, t in tensors.items()}
    b = max(sizes.values())
    if any(s not in (1, b) for s in sizes.values()):
        listed = ", ".join(f"{name} {s}" for name, s in sizes.items())
        raise ValueError(
            f"batch sizes do not match ({listed}): "
            "give each input batch size 1 or the same size as the others"
        )
    return b


def _expand_batch(t: Tensor, b: int) -> Tensor:
    return t.expand(b, *t.shape[1:]) if t.shape[0] != b else t


def _batched_mask(mask: Tensor) -> Tensor:
    if mask.dim() == 2:
        return mask.unsqueeze(0)
    if mask.dim() != 3:
        raise ValueError(f"a MASK must be [B,H,W] or [H,W], got shape {tuple(mask.shape)}")
    return mask


def _check_image(name: str, image: Tensor) -> None:
    if image.dim() != 4:
        raise ValueError(f"{name} IMAGE must be [B,H,W,C], got shape {tuple(image.shape)}")


def _size(hw) -> str:
    return f"{hw[1]}x{hw[0]} (WxH)"


def _landing(anchor, src_hw, tgt_hw, p: Placement) -> tuple[float, float]:
    """Where the anchor lands on the target: same relative position (pixel-centre aware), plus the shift."""
    (ax, ay), (h, w), (ht, wt) = anchor, src_hw, tgt_hw
    return (ax + 0.5) * wt / w - 0.5 + p.shift_x, (ay + 0.5) * ht / h - 0.5 + p.shift_y


def forward(anchor, src_hw, tgt_hw, p: Placement, points) -> list[tuple[float, float]]:
    """T applied to source points (x, y) (pixel-centre coordinates): their target positions. `anchor` is
    `mask_anchor` of the source mask, src_hw / tgt_hw the (H, W) of source and target."""
    (ax, ay) = anchor
    tx, ty = _landing(anchor, src_hw, tgt_hw, p)
    theta = math.radians(p.rotation)
    cos, sin = math.cos(theta), math.sin(theta)
    return [(tx + p.scale * (cos * (x - ax) + sin * (y - ay)), ty + p.scale * (-sin * (x - ax) + cos * (y - ay)))
            for x, y in points]


def _inverse_grid(anchor, src_hw, tgt_hw, p: Placement, device, dtype) -> Tensor:
    """For every target pixel, its source position as grid_sample's normalized (x, y): [Ht,Wt,2]."""
    (ax, ay), (h, w), (ht, wt) = anchor, src_hw, tgt_hw
    tx, ty = _landing(anchor, src_hw, tgt_hw, p)
    ys = torch.arange(ht, device=device, dtype=dtype).unsqueeze(1)  # [Ht,1], broadcasts against xs
    xs = torch.arange(wt, device=device, dtype=dtype).unsqueeze(0)  # [1,Wt]
    dx, dy = xs - tx, ys - ty
    theta = math.radians(p.rotation)
    cos, sin = math.cos(theta), math.sin(theta)
    # Forward T: d_t = scale * R d_s with R = [[cos, sin], [-sin, cos]], counter-clockwise on screen because
    # y points down. Here we apply the inverse, R^T / scale.
    sx = ax + (dx * cos - dy * sin) / p.scale
    sy = ay + (dx * sin + dy * cos) / p.scale
    # align_corners=False: the centre of pixel i sits at normalized (2i + 1) / size - 1.
    return torch.stack([(2 * sx + 1) / w - 1, (2 * sy + 1) / h - 1], dim=-1)


def _off_canvas_message(anchor, src_hw, tgt_hw, p: Placement) -> str:
    tx, ty = _landing(anchor, src_hw, tgt_hw, p)
    ht, wt = tgt_hw
    where = f"the anchor (source mask bbox centre) lands at ({tx:g}, {ty:g}) on the {wt}x{ht} (WxH) target"
    cx, cy = min(max(tx, 0.0), wt - 1.0), min(max(ty, 0.0), ht - 1.0)
    if (cx, cy) == (tx, ty):
        return (
            f"the placed region is empty: {where}, but at scale {p.scale:g} no pixel of the mask covers the "
            "canvas: increase scale"
        )
    return (
        f"the placed region falls entirely outside the target canvas: {where}; "
        f"set shift_x to {p.shift_x - (tx - cx):g} and shift_y to {p.shift_y - (ty - cy):g} to bring it back"
    )
