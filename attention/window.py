"""The working region: the method at the model's own resolution on a window of the target around the geometry, and
the way back (crop and stitch).

Run at a photo's own size, the method is slow (attention is quadratic in the tokens: one SD1.5 UNet call at a 2048 px
target costs as much as ~200 at 512 px) and poor (SD1.5 was trained at 512 px). So it runs on a window of the target
around M_geo (the union of all geometries) with a context margin, resampled to a working size suited to the backbone;
each source is cut around its mask by a window of the same size and resampled by the same factor, so a geometry keeps
its size relative to the target's texture (at scale 1, one source pixel stays one target pixel). The decoded canvas is
resampled back to the window and composited into the full-resolution target: every pixel outside the composite's
blend band stays the target's own.

With the working region off (working_size 0) the window is the whole target at its own pixels, as before: a source
of another size is cut (or padded) to the target's size around its mask, since every row runs at one size.

Boxes are (x0, y0, x1, y1), half-open, in an image's own pixels. A box may reach past its image: there a crop repeats
the image's border pixels, and masks are 0. `layout` is the arithmetic on boxes (web/placement_math.js's
workingWindow mirrors it number for number); `plan` reads the boxes from the masks.

IMAGE tensors are [B,H,W,C]; MASK tensors [B,H,W] with 1 = region.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage  # a ComfyUI dependency (comfy/samplers.py imports scipy)
from torch import Tensor

from . import composite as _composite
from . import tokens
from .edit import binarize

CONTEXT = 0.5  # default margin on every side, as a fraction of the larger side of the geometry's box
MIN_MARGIN = 64  # px of target on every side at least: the composite's blend band stays inside the window
MAX_UPSCALE = 2.0  # a small geometry's window grows (more context) until the resampling enlarges it at most this much
CANVAS_MULTIPLE = 16  # working canvas sides: the largest pixel step of the models (a DiT's 2x2 tokens of 8 px cells)
PAD_STEPS = (1, 8, 16, 32, 64)  # a decoded canvas is the planned one padded to one of these (a model's pixel step)


@dataclass(frozen=True)
class Window:
    """Where the working canvas sits: a box on the target and a box of the same size on each source row, both
    resampled to `canvas_hw`. The stitcher: made from the scene, it takes the decoded canvas back to the target."""

    target_hw: tuple[int, int]
    source_hw: tuple[int, int]
    box: tuple[int, int, int, int]  # on the target
    source_origins: tuple[tuple[int, int], ...]  # (x0, y0) of each source row's box (the size of `box`)
    canvas_hw: tuple[int, int]
    working_size: int = 0
    upscale_limited: bool = False  # the target is too small to give the working size at MAX_UPSCALE

    @classmethod
    def whole(cls, target_hw) -> Window:
        """The whole target at its own pixels, its source of the same size (working_size 0)."""
        (h, w) = target_hw
        return cls((h, w), (h, w), (0, 0, w, h), ((0, 0),), (h, w))

    @property
    def size_hw(self) -> tuple[int, int]:
        return self.box[3] - self.box[1], self.box[2] - self.box[0]

    @property
    def factor(self) -> float:
        """Canvas pixels per target pixel (the geometric mean of the two axes', which differ by the rounding of the
        canvas to CANVAS_MULTIPLE only)."""
        (ch, cw), (bh, bw) = self.canvas_hw, self.size_hw
        return math.sqrt(ch * cw / (bh * bw))

    @property
    def resampled(self) -> bool:
        return self.canvas_hw != self.size_hw

    def describe(self) -> str:
        (bh, bw), (ch, cw) = self.size_hw, self.canvas_hw
        where = f"the target's {bw}x{bh} px window at ({self.box[0]}, {self.box[1]})"
        if self.working_size <= 0:
            return f"the whole {bw}x{bh} target at its own pixels (working_size 0)"
        return f"{where} resampled {self.factor:.2f}x to {cw}x{ch} (working_size {self.working_size})"


def _place(centre: float, size: int, length: int) -> int:
    """Origin of a `size` px window centred on `centre` (edge coordinates), moved inside [0, length) where it fits,
    else to cover all of it."""
    return min(max(0, length - size), max(min(0, length - size), math.floor(centre - size / 2 + 0.5)))


def _multiple(v: float) -> int:
    return max(CANVAS_MULTIPLE, math.floor(v / CANVAS_MULTIPLE + 0.5) * CANVAS_MULTIPLE)


def layout(geometry_box, source_boxes, target_hw, source_hw, working_size: int = 0, context: float = CONTEXT) -> Window:
    """The window for M_geo's box on a `target_hw` (H, W) target and each source row's mask box on `source_hw`.

    working_size 0: the whole target at its own pixels. Otherwise the window holds the geometry's box and every source
    mask's box with a margin of `context` x their larger side (at least MIN_MARGIN px) on each side, grown about its
    centre to at least (working_size / MAX_UPSCALE)^2 px of area, within the target (a source mask larger than the
    target reaches past it), centred on the geometry; the canvas has about working_size^2 px (at most MAX_UPSCALE x
    the window's), sides multiples of CANVAS_MULTIPLE."""
    (ht, wt), (hs, ws) = target_hw, source_hw
    sw = max(b[2] - b[0] for b in source_boxes)
    sh = max(b[3] - b[1] for b in source_boxes)
    limited = False
    if working_size <= 0:
        bw, bh, canvas = wt, ht, (ht, wt)
    else:
        need_w, need_h = max(geometry_box[2] - geometry_box[0], sw), max(geometry_box[3] - geometry_box[1], sh)
        margin = max(MIN_MARGIN, context * max(need_w, need_h))
        fw, fh = need_w + 2 * margin, need_h + 2 * margin
        half = working_size / MAX_UPSCALE
        least = half * half
        if fw * fh < least:
            k = math.sqrt(least / (fw * fh))
            fw, fh = fw * k, fh * k
        lim_w, lim_h = max(wt, sw), max(ht, sh)
        bw, bh = min(lim_w, math.ceil(fw)), min(lim_h, math.ceil(fh))
        if bw * bh < least:  # one side met the target's edge: the other grows within its own
            if bw == lim_w:
                bh = min(lim_h, math.ceil(least / bw))
            else:
                bw = min(lim_w, math.ceil(least / bh))
        f = working_size / math.sqrt(bw * bh)
        limited = f > MAX_UPSCALE
        f = min(MAX_UPSCALE, f)
        canvas = (_multiple(bh * f), _multiple(bw * f))
    box_x = _place((geometry_box[0] + geometry_box[2]) / 2, bw, wt)
    box_y = _place((geometry_box[1] + geometry_box[3]) / 2, bh, ht)
    origins = tuple((_place((b[0] + b[2]) / 2, bw, ws), _place((b[1] + b[3]) / 2, bh, hs)) for b in source_boxes)
    return Window(target_hw=(ht, wt), source_hw=(hs, ws), box=(box_x, box_y, box_x + bw, box_y + bh),
                  source_origins=origins, canvas_hw=canvas, working_size=max(0, working_size), upscale_limited=limited)


def mask_box(mask: Tensor) -> tuple[int, int, int, int]:
    """Box of the binarized [H,W] mask (or of the union of a [B,H,W] batch); the whole mask when it is empty."""
    region = binarize(mask) > 0
    if region.dim() == 3:
        region = region.any(0)
    ys, xs = torch.nonzero(region.any(1)).flatten(), torch.nonzero(region.any(0)).flatten()
    if ys.numel() == 0:
        return 0, 0, region.shape[1], region.shape[0]
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def plan(geometry_mask: Tensor, source_mask: Tensor, working_size: int = 0, context: float = CONTEXT) -> Window:
    """`layout` for M_geo [P,H,W] (the window holds the union of its rows) and the source masks [S,Hs,Ws]."""
    return layout(mask_box(geometry_mask), [mask_box(m) for m in source_mask], tuple(geometry_mask.shape[-2:]),
                  tuple(source_mask.shape[-2:]), working_size, context)


# ---------------------------------------------------------------- crop and resample

def crop(t: Tensor, origins, size_hw, mask: bool = False) -> Tensor:
    """Row i's `size_hw` window at origins[i] (one origin: every row's) of images [B,H,W,C] (border pixels repeated
    past the image) or masks [B,H,W] (`mask`: 0 past it). The input itself when the window is the whole image."""
    h, w = size_hw
    height, width = t.shape[1:3]
    if (h, w) == (height, width) and all(tuple(o) == (0, 0) for o in origins):
        return t
    rows = []
    for i in range(t.shape[0]):
        x0, y0 = origins[i if len(origins) > 1 else 0]
        ys, xs = torch.arange(y0, y0 + h, device=t.device), torch.arange(x0, x0 + w, device=t.device)
        row = t[i].index_select(0, ys.clamp(0, height - 1)).index_select(1, xs.clamp(0, width - 1))
        if mask:
            row = row * (((ys >= 0) & (ys < height))[:, None] & ((xs >= 0) & (xs < width))[None, :]).to(row.dtype)
        rows.append(row)
    return torch.stack(rows)


def resample_image(images: Tensor, size_hw) -> Tensor:
    """[B,H,W,C] -> [B,h,w,C]: bilinear, antialiased when it shrinks; the input itself at its own size."""
    if tuple(images.shape[1:3]) == tuple(size_hw):
        return images
    x = F.interpolate(images.movedim(-1, 1).float(), size=tuple(size_hw), mode="bilinear", align_corners=False,
                      antialias=True)
    return x.movedim(1, -1).clamp(0, 1).to(images.dtype)


def resample_mask(masks: Tensor, size_hw) -> Tensor:
    """[B,H,W] binary -> [B,h,w] binary. Enlarging is bilinear, binarized at 0.5. Shrinking keeps the pixels (cells)
    the mask covers at least half, and those holding more than half as much as the fullest of their 3x3
    neighbours (a thin structure's own cells, not those it grazes: tokens.cells' anchors); where that loses or
    breaks a connected part of the cells the mask touches, that row takes tokens.cells' rule itself (exact, slower
    on large masks): no part is lost and a crack stays one unbroken chain, however thin it becomes. The input
    itself at its own size."""
    h, w = size_hw
    if tuple(masks.shape[1:]) == (h, w):
        return masks
    if h > masks.shape[1] or w > masks.shape[2]:
        up = F.interpolate(masks[:, None].float(), size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        return binarize(up).to(masks.dtype)
    c = tokens.coverage(masks, h, w)  # [B,h,w]
    near = F.max_pool2d(c[:, None], 3, stride=1, padding=1)[:, 0]
    kept = (c >= 0.5) | ((c > 0) & (c > 0.5 * near))
    eight = np.ones((3, 3), dtype=bool)
    for i in range(kept.shape[0]):
        touched, parts = ndimage.label((c[i] > 0).cpu().numpy(), structure=eight)
        _, pieces = ndimage.label(kept[i].cpu().numpy(), structure=eight)
        held = np.unique(touched[kept[i].cpu().numpy()])
        if pieces != parts or held.size != parts:
            kept[i] = tokens.cells(masks[i:i + 1], h, w)[0].to(kept.device)
    return kept.to(masks.dtype)


def padded(size_hw, multiple: int) -> tuple[int, int]:
    """`size_hw` rounded up to multiples of `multiple`."""
    return tuple(-(-s // multiple) * multiple for s in size_hw)


def pad(t: Tensor, multiple: int, mask: bool = False) -> Tensor:
    """Images [B,H,W,C] (border repeated) or masks [B,H,W] (`mask`: 0) padded at the right and bottom to sides that
    are multiples of `multiple` (a model's pixel step); the input itself when they are already."""
    return crop(t, [(0, 0)], padded(t.shape[1:3], multiple), mask)


# ---------------------------------------------------------------- stitch

def check_decoded(decoded_hw, window: Window) -> str | None:
    """Why a decoded image of `decoded_hw` is not this window's canvas (padded at right and bottom to a model's pixel
    step, PAD_STEPS), or None."""
    if any(tuple(decoded_hw) == padded(window.canvas_hw, step) for step in PAD_STEPS):
        return None
    (h, w), (ch, cw) = decoded_hw, window.canvas_hw
    return f"the decoded image is {w}x{h} (WxH) but this scene's working canvas is {cw}x{ch}"


def composite(decoded: Tensor, target: Tensor, mask: Tensor, window: Window, feather: float = 4.0,
              levels: int = 3) -> tuple[Tensor, Tensor]:
    """The decoded canvas stitched into the full-resolution target: (image [B,H,W,C], blend band [B,H,W] bool).

    The canvas (its padding cropped) is resampled to the window's box, and composite.composite joins it to the
    target on the part of the box around M_geo that the blend can reach (twice the blend band's reach: the pyramid
    sees the decoded pixels around the band); everywhere else the output is the target. Outside the returned band
    every pixel is the target's own, bit for bit."""
    bx0, by0, bx1, by1 = window.box
    ht, wt = window.target_hw
    mask = mask.unsqueeze(0) if mask.dim() == 2 else mask
    x0, y0, x1, y1 = max(0, bx0), max(0, by0), min(wt, bx1), min(ht, by1)
    if window.resampled:  # the whole target at its own pixels (working_size 0) stays today's composite, bit for bit
        reach = 2 * (math.ceil(feather) + 8 * 2 ** levels)
        gx0, gy0, gx1, gy1 = mask_box(mask)
        x0, y0, x1, y1 = max(x0, gx0 - reach), max(y0, gy0 - reach), min(x1, gx1 + reach), min(y1, gy1 + reach)
    ch, cw = window.canvas_hw
    inside = resample_image(decoded[:, :ch, :cw], window.size_hw)[:, y0 - by0:y1 - by0, x0 - bx0:x1 - bx0]
    if (x0, y0, x1, y1) == (0, 0, wt, ht):
        return _composite.composite(inside, target, mask, feather, levels), _composite.blend_band(mask, feather, levels)
    part = _composite.composite(inside, target[:, y0:y1, x0:x1], mask[:, y0:y1, x0:x1], feather, levels)
    out = target.expand(part.shape[0], *target.shape[1:]).clone()
    out[:, y0:y1, x0:x1] = part
    band = torch.zeros(part.shape[0], ht, wt, dtype=torch.bool, device=part.device)
    band[:, y0:y1, x0:x1] = _composite.blend_band(mask[:, y0:y1, x0:x1], feather, levels)
    return out, band
