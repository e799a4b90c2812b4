"""Detail-preserving composite: the decoded output inside a feathered M_geo, the original target outside it.

A training-free take on DiffHarmony++'s Harmony-VAE (which restores the background with trained weights): the
decoded image D and the target T are joined with a Laplacian-pyramid blend (Burt & Adelson 1983) whose weights
are the Gaussian pyramid of a feathered M_geo, so low frequencies (colour, shading) cross the seam over a wide
band and fine texture over a narrow one. The blend is computed on the residual E = D - T:

    out = T + sum_l EXPAND^l(A_l * L_l(E)),   A_l = REDUCE^l(alpha),  L_l the Laplacian levels of E

The binomial kernel has finite support, so the correction is exactly 0 outside a band that `blend_band`
computes from the same operations; there the output is the target, selected with torch.where (bit for bit).
Inside M_geo the output is D itself.

IMAGE tensors are [B,H,W,C] in [0,1]; MASK tensors are [B,H,W] (or [H,W]) with 1 = region.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .edit import binarize

# 5-tap binomial kernel of the Burt-Adelson pyramid; EXPAND uses it times 2 per axis (zeros were inserted)
_TAPS = (1.0, 4.0, 6.0, 4.0, 1.0)


def feathered(mask: Tensor, feather: float) -> Tensor:
    """[B,1,H,W] weights: 1 on the binarized mask, falling linearly to 0 at `feather` pixels from it (distance
    in octagonal steps: 3x3 square and cross dilations alternate); feather 0 gives the binary mask."""
    alpha = binarize(mask).float()
    steps = math.ceil(feather)
    reached = alpha
    for k in range(1, steps + 1):
        if k % 2:
            reached = F.max_pool2d(reached, 3, stride=1, padding=1)
        else:  # the cross: max of the vertical and horizontal 3-neighbourhoods
            reached = torch.maximum(F.max_pool2d(reached, (3, 1), stride=1, padding=(1, 0)),
                                    F.max_pool2d(reached, (1, 3), stride=1, padding=(0, 1)))
        ring = (reached > 0) & (alpha == 0)
        alpha = torch.where(ring, torch.full_like(alpha, max(0.0, 1.0 - k / (feather + 1))), alpha)
    return alpha


def _separable(x: Tensor, scale: float, stride: int) -> Tensor:
    """The binomial kernel (times `scale` per axis) over [N,C,H,W] with a reflected border, then every
    `stride`-th pixel."""
    c = x.shape[1]
    k = torch.tensor(_TAPS, dtype=x.dtype, device=x.device) * (scale / 16)
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, 5).expand(c, 1, 1, 5), groups=c, stride=(1, stride))
    return F.conv2d(x, k.view(1, 1, 5, 1).expand(c, 1, 5, 1), groups=c, stride=(stride, 1))


def _reduce(x: Tensor) -> Tensor:
    """[N,C,H,W] -> [N,C,H/2,W/2] (H, W even)."""
    return _separable(x, 1.0, 2)


def _expand(x: Tensor) -> Tensor:
    """[N,C,h,w] -> [N,C,2h,2w]: zeros inserted between pixels, then the kernel (x2 per axis: half the taps
    meet a zero)."""
    n, c, h, w = x.shape
    up = x.new_zeros(n, c, 2 * h, 2 * w)
    up[..., ::2, ::2] = x
    return _separable(up, 2.0, 1)


def _pad_to(x: Tensor, multiple: int) -> Tensor:
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


def _blend(residual: Tensor, alpha: Tensor, levels: int) -> Tensor:
    """sum_l EXPAND^l(A_l * L_l(residual)) for [N,C,H,W] residual and [N,1,H,W] alpha, H and W multiples of
    2^levels."""
    gaussians, weights = [residual], [alpha]
    for _ in range(levels):
        gaussians.append(_reduce(gaussians[-1]))
        weights.append(_reduce(weights[-1]))
    out = weights[-1] * gaussians[-1]
    for level in range(levels - 1, -1, -1):
        laplacian = gaussians[level] - _expand(gaussians[level + 1])
        out = weights[level] * laplacian + _expand(out)
    return out


def _support(alpha: Tensor, levels: int) -> Tensor:
    """Where _blend(., alpha, levels) can be non-zero: the same operations on the indicator of each level's
    weights, whose kernels are positive, so `> 0` marks exactly the pixels that a non-zero weight reaches."""
    reach = [alpha > 0]
    for _ in range(levels):
        reach.append(_reduce(reach[-1].double()) > 0)
    out = reach[-1].double()
    for level in range(levels - 1, -1, -1):
        # L_l = G_l - EXPAND(G_{l+1}) reaches one EXPAND further than the weights of level l
        out = reach[level].double() + _expand(out)
    return out > 0


def _check(image: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    if image.dim() != 4 or target.dim() != 4:
        raise ValueError(f"images must be [B,H,W,C], got {tuple(image.shape)} (decoded) and {tuple(target.shape)} "
                         "(target)")
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if image.shape[1:3] != target.shape[1:3] or mask.shape[1:] != target.shape[1:3]:
        raise ValueError(
            f"the decoded image is {image.shape[2]}x{image.shape[1]}, the target {target.shape[2]}x{target.shape[1]} "
            f"and the mask {mask.shape[2]}x{mask.shape[1]} (WxH): connect the target and the geometry mask of the "
            "same HA_GeometryImageEdit whose composite was decoded (all three must have the same size)")
    sizes = {image.shape[0], target.shape[0], mask.shape[0]} - {1}
    if len(sizes) > 1:
        raise ValueError(f"batch sizes do not match (decoded {image.shape[0]}, target {target.shape[0]}, mask "
                         f"{mask.shape[0]}): give each batch size 1 or the same size as the others")
    return mask


def pyramid_levels(levels: int, height: int, width: int) -> int:
    """`levels`, capped so that the coarsest level keeps at least 4 pixels a side (the reflected border)."""
    return max(0, min(levels, int(math.log2(max(1, min(height, width)))) - 2))


def blend_band(mask: Tensor, feather: float = 4.0, levels: int = 3) -> Tensor:
    """[B,H,W] bool: the pixels `composite` may take from the decoded image (M_geo and the blend band around
    it); every other pixel of its output is the target's."""
    mask = mask.unsqueeze(0) if mask.dim() == 2 else mask
    h, w = mask.shape[1:]
    levels = pyramid_levels(levels, h, w)
    alpha = _pad_to(feathered(mask.unsqueeze(1), feather), 2 ** levels)
    return _support(alpha, levels)[:, 0, :h, :w] | (binarize(mask) > 0)


def composite(image: Tensor, target: Tensor, mask: Tensor, feather: float = 4.0, levels: int = 3) -> Tensor:
    """The decoded `image` inside the feathered `mask`, `target` outside: [B,H,W,C] like the target.

    Inside the binarized mask the output is `image`; outside `blend_band(mask, feather, levels)` it is `target`,
    bit for bit; between them a Laplacian-pyramid blend of `levels` levels over the feathered mask."""
    if feather < 0 or levels < 0:
        raise ValueError(f"feather {feather} and levels {levels} must be >= 0 (0 levels: a plain feathered blend)")
    mask = _check(image, target, mask)
    b = max(image.shape[0], target.shape[0], mask.shape[0])
    image, target, mask = (t.expand(b, *t.shape[1:]) for t in (image, target, mask))
    channels = min(image.shape[-1], target.shape[-1])
    decoded = image[..., :channels].to(target.device, target.dtype)
    h, w = target.shape[1:3]
    levels = pyramid_levels(levels, h, w)
    work = torch.float32 if target.device.type == "mps" else torch.float64
    residual = (decoded.to(work) - target[..., :channels].to(work)).permute(0, 3, 1, 2)
    alpha = feathered(mask.unsqueeze(1).to(target.device), feather).to(work)
    correction = _blend(_pad_to(residual, 2 ** levels), _pad_to(alpha, 2 ** levels), levels)[..., :h, :w]
    blended = (target[..., :channels].to(work) + correction.permute(0, 2, 3, 1)).clamp(0, 1).to(target.dtype)
    band = blend_band(mask.to(target.device), feather, levels).unsqueeze(-1)
    inside = (binarize(mask.to(target.device)) > 0).unsqueeze(-1)
    out = torch.where(inside, decoded, torch.where(band, blended, target[..., :channels]))
    if target.shape[-1] > channels:  # e.g. RGBA target and RGB decode: keep the target's extra channels
        out = torch.cat([out, target[..., channels:]], dim=-1)
    return out
