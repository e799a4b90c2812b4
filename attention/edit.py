"""Editing stage: the geometry edit T that places the masked source patch on the target canvas.

The placement convention (the one description of it; web/placement_math.js implements the same numbers for
the node's placement view, and tests/test_placement_browser.py checks the two against each other):
- Coordinates are pixel-centre coordinates: the pixel at column j, row i has its centre at (x, y) = (j, i)
  and covers [j - 0.5, j + 0.5] x [i - 0.5, i + 0.5]; x points right, y points down. Masks are binarized at 0.5.
- The anchor a is the centre of the bounding box of the source mask (`mask_anchor`).
- The anchor lands at the same relative position on the target, (a + 0.5) * target_size / source_size - 0.5,
  moved by less than half a pixel so that it keeps its place within a pixel (a whole number of pixels from a:
  at scale 1 and no rotation, each source pixel lands on one target pixel, a 1 px crack stays 1 px sharp),
  then moves by (shift_x, shift_y) target pixels (`_landing`). The patch keeps its pixel size: only `scale`
  resizes it. Source and target of one size: the anchor stays at a, plus the shift.
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
    # only the target pixels the moved masks can reach are sampled (a phone photo's 12 Mpx would cost seconds);
    # every pixel is computed on its own, so the values are those of a warp of the whole canvas
    x0, y0, x1, y1 = _reach([(a, m) for a, m in zip(anchors, source_mask, strict=True)], (h, w), (ht, wt), placement)
    grid = torch.stack([_inverse_grid(a, (h, w), placement, source.device, work, (ht, wt), (x0, y0, x1, y1))
                        for a in anchors])

    def warp(x: Tensor) -> Tensor:  # [B,C,H,W] -> [B,C,y1-y0,x1-x0]
        return F.grid_sample(x.to(work), grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    warped = warp(source.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).to(target.dtype)
    geo_mask = target.new_zeros(b, ht, wt)
    geo_mask[:, y0:y1, x0:x1] = binarize(warp(binarize(source_mask).unsqueeze(1))[:, 0]).to(target.dtype)

    empty = geo_mask.flatten(1).amax(dim=1) == 0
    if empty.any():
        i = int(torch.nonzero(empty)[0])
        raise ValueError(_off_canvas_message(anchors[i], (h, w), (ht, wt), placement))

    geometry = target.clone(memory_format=torch.contiguous_format)
    geometry[:, y0:y1, x0:x1] = torch.where(geo_mask[:, y0:y1, x0:x1].unsqueeze(-1) > 0, warped,
                                            target[:, y0:y1, x0:x1])
    return geometry, geo_mask


def _reach(anchored_masks, src_hw, tgt_hw, p: Placement) -> tuple[int, int, int, int]:
    """Box (x0, y0, x1, y1), half-open and on the canvas, of the target pixels whose bilinear sample of T^-1 can
    touch a pixel of any of the masks: the forward image of each mask's box grown by one pixel, and a pixel more."""
    ht, wt = tgt_hw
    xs, ys = [], []
    for anchor, mask in anchored_masks:
        rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
        if rows.numel() == 0:
            continue
        bx0, bx1, by0, by1 = cols[0].item() - 1, cols[-1].item() + 1, rows[0].item() - 1, rows[-1].item() + 1
        for x, y in forward(anchor, src_hw, tgt_hw, p, [(bx0, by0), (bx1, by0), (bx0, by1), (bx1, by1)]):
            xs.append(x)
            ys.append(y)
    if not xs:
        return 0, 0, wt, ht
    x0, y0 = max(0, math.floor(min(xs)) - 1), max(0, math.floor(min(ys)) - 1)
    x1, y1 = min(wt, math.ceil(max(xs)) + 2), min(ht, math.ceil(max(ys)) + 2)
    return (x0, y0, max(x0, x1), max(y0, y1)) if x1 > x0 and y1 > y0 else (0, 0, 0, 0)


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
    """Where the anchor lands on the target: same relative position (pixel-centre aware) to the nearest whole
    pixel offset from the anchor (halves round up), plus the shift."""
    (ax, ay), (h, w), (ht, wt) = anchor, src_hw, tgt_hw
    dx = math.floor((ax + 0.5) * wt / w - 0.5 - ax + 0.5)
    dy = math.floor((ay + 0.5) * ht / h - 0.5 - ay + 0.5)
    return ax + dx + p.shift_x, ay + dy + p.shift_y


def forward(anchor, src_hw, tgt_hw, p: Placement, points) -> list[tuple[float, float]]:
    """T applied to source points (x, y) (pixel-centre coordinates): their target positions. `anchor` is
    `mask_anchor` of the source mask, src_hw / tgt_hw the (H, W) of source and target."""
    (ax, ay) = anchor
    tx, ty = _landing(anchor, src_hw, tgt_hw, p)
    theta = math.radians(p.rotation)
    cos, sin = math.cos(theta), math.sin(theta)
    return [(tx + p.scale * (cos * (x - ax) + sin * (y - ay)), ty + p.scale * (-sin * (x - ax) + cos * (y - ay)))
            for x, y in points]


def _inverse_grid(anchor, src_hw, p: Placement, device, dtype, tgt_hw, box) -> Tensor:
    """For every target pixel of `box` (x0, y0, x1, y1), its source position as grid_sample's normalized (x, y):
    [y1-y0, x1-x0, 2]."""
    (ax, ay), (h, w), (x0, y0, x1, y1) = anchor, src_hw, box
    tx, ty = _landing(anchor, src_hw, tgt_hw, p)
    ys = torch.arange(y0, y1, device=device, dtype=dtype).unsqueeze(1)  # [h,1], broadcasts against xs
    xs = torch.arange(x0, x1, device=device, dtype=dtype).unsqueeze(0)  # [1,w]
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
