"""Colour adjustment of the geometry image: eq. 1's uniform shift, its regional variant (c_tar varies with
position) and the ablation's histogram matching.

IMAGE tensors are [B,H,W,C] in [0,1]; MASK tensors are [B,H,W] (or [H,W]), binarized at 0.5.
Batches broadcast as in edit.place_source: each input has batch size 1 or the common size B.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .edit import _batched_mask, _check_image, _common_batch, _expand_batch, _size, binarize


def ring(mask: Tensor, width: int) -> Tensor:
    """dilate(M, width) - M for the binarized mask M, with a (2*width+1)^2 square structuring element."""
    if int(width) != width or width < 1:
        raise ValueError(f"ring width must be a whole number of pixels >= 1, got {width}")
    m = binarize(_batched_mask(mask))
    w = int(width)
    # computed on the masks' box grown by `width` only (exactly what the whole image gives: no dilation reaches
    # further, and the max over a window always holds the pixel itself): a phone photo's 12 Mpx would cost seconds
    rows, cols = torch.nonzero(m.amax(0).any(1)).flatten(), torch.nonzero(m.amax(0).any(0)).flatten()
    out = torch.zeros_like(m)
    if rows.numel():
        y0, y1 = max(0, rows[0].item() - w), rows[-1].item() + w + 1
        x0, x1 = max(0, cols[0].item() - w), cols[-1].item() + w + 1
        part = m[:, y0:y1, x0:x1]
        out[:, y0:y1, x0:x1] = F.max_pool2d(part.unsqueeze(1), kernel_size=2 * w + 1, stride=1, padding=w)[:, 0] - part
    return out


def ring_mean(image: Tensor, mask: Tensor, width: int) -> Tensor:
    """Mean colour [B,C] of the image on ring(mask, width)."""
    return _ring_mean(image, mask, width, "mask")


def mean_shift(
    geometry_image: Tensor,
    geometry_mask: Tensor,
    source: Tensor,
    source_mask: Tensor,
    target: Tensor,
    strength: float,
    ring_width: int,
) -> Tensor:
    """Eq. 1: p_geo = p~ + a * M_geo * (c_tar - c_src), then clamped to [0,1].

    c_src is the mean colour of the source on ring(M_src) (source coordinates), c_tar that of the target on
    ring(M_geo) (target coordinates). The paper's formula is unclamped; the clamp is only there because an
    IMAGE must stay in [0,1]. a = 0 returns the geometry image unchanged without computing any ring.
    """
    if strength == 0:
        return geometry_image.clone()
    return _eq1(geometry_image, geometry_mask, source, source_mask, target, strength, ring_width)[0].clamp(0.0, 1.0)


def regional_shift(
    geometry_image: Tensor,
    geometry_mask: Tensor,
    source: Tensor,
    source_mask: Tensor,
    target: Tensor,
    strength: float,
    ring_width: int,
    working_size: int = 128,
) -> Tensor:
    """Eq. 1 with a c_tar that varies with position, from the target's colour on ring(M_geo) near each pixel:

        c_tar(x) = sum_r K(x - r) t(r) / sum_r K(x - r)    over the ring pixels r,  K(d) = (d^2 + s^2)^(-3/2)
        p_geo(x) = p~(x) + a M_geo(x) (c_tar(x) - c_src),  then clamped to [0,1] like eq. 1

    s = max(ring_width, grid cell) px softens the kernel. c_tar(x) is a normalised weighted mean of the ring's
    colours with a smooth kernel of x, so it is smooth across the patch and follows the light and colour of
    the target around each part of it; far ring pixels still count (K decays as d^-3, not to zero), so
    every pixel of a large patch has a defined colour. Evaluated on a grid of at most `working_size` cells per
    side (ring colours summed per cell) and bilinearly upsampled.

    Exactness: computed as eq. 1 plus a M_geo(x) (c_tar(x) - c_tar), the difference taken on t(r) - t(r0) (r0
    the ring's first pixel) and skipped when that is zero everywhere: where the target's ring is uniform the
    result is eq. 1's, bit for bit.
    """
    if strength == 0:
        return geometry_image.clone()
    out, m, r, target = _eq1(geometry_image, geometry_mask, source, source_mask, target, strength, ring_width)
    out = out.clone()
    for i in range(out.shape[0]):
        field = _regional_field(target[i], r[i], m[i, ..., 0], ring_width, working_size)
        if field is not None:
            out[i] += m[i] * (strength * field).to(out.dtype)
    return out.clamp(0.0, 1.0)


def _eq1(geometry_image, geometry_mask, source, source_mask, target, strength, ring_width):
    """Eq. 1 unclamped, and what the regional variant reuses: (out, M_geo [B,H,W,1], ring(M_geo) [B,H,W],
    target [B,H,W,C]), all at the common batch B."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"colour shift strength a must be in [0, 1], got {strength}")
    geometry_mask, source_mask = _batched_mask(geometry_mask), _batched_mask(source_mask)
    _check_image("geometry image", geometry_image)
    _check_same_size(geometry_image, geometry_mask, "geometry image", "geometry mask")
    b = _common_batch(
        geometry_image=geometry_image,
        geometry_mask=geometry_mask,
        source=source,
        source_mask=source_mask,
        target=target,
    )
    c_src = _ring_mean(source, source_mask, ring_width, "source mask")
    c_tar = _ring_mean(target, geometry_mask, ring_width, "geometry mask")
    shift = strength * (c_tar - c_src).to(geometry_image.dtype)  # [B,C]
    m = binarize(geometry_mask).to(geometry_image.dtype).unsqueeze(-1)  # [B,H,W,1]
    out = geometry_image + m * shift[:, None, None, :]
    return _expand_batch(out, b), _expand_batch(m, b), _expand_batch(ring(geometry_mask, ring_width), b), \
        _expand_batch(target, b)


def _regional_field(target: Tensor, r: Tensor, m: Tensor, ring_width: int, working_size: int):
    """c_tar(x) - c_tar for one image ([H,W,C] target, [H,W] ring and mask), or None where it is zero."""
    h, w = r.shape
    first = int(torch.nonzero(r.flatten() > 0)[0])
    dev = (target.double() - target.reshape(h * w, -1)[first].double()) * r[..., None].double()  # t(r) - t(r0)
    if not dev.any():
        return None
    mean_dev = dev.sum(dim=(0, 1)) / r.double().sum()  # c_tar - t(r0)
    f = max(1, math.ceil(max(h, w) / working_size))  # grid cell: f x f pixels
    hp, wp = -(-h // f) * f, -(-w // f) * f

    def cells(x: Tensor) -> Tensor:  # [H,W,C] -> [h',w',C] sums per cell (zero padding adds nothing)
        x = F.pad(x.permute(2, 0, 1), (0, wp - w, 0, hp - h))
        return F.avg_pool2d(x[None], f)[0].permute(1, 2, 0) * f * f

    ring_sum, ring_count = cells(dev), cells(r[..., None].double())[..., 0]
    mask_cells = cells(m[..., None].double())[..., 0] > 0
    ys, xs = torch.nonzero(ring_count > 0, as_tuple=True)
    centre = lambda i: (i.double() + 0.5) * f - 0.5  # noqa: E731  cell centre in pixels
    ry, rx, rc, rs = centre(ys), centre(xs), ring_count[ys, xs], ring_sum[ys, xs]  # [n_ring], [n_ring, C]
    # cells whose bilinear footprint touches the mask: the mask's cells and their neighbours
    near = F.max_pool2d(mask_cells[None, None].double(), 3, stride=1, padding=1)[0, 0] > 0
    qy, qx = torch.nonzero(near, as_tuple=True)
    soft2 = float(max(ring_width, f)) ** 2
    grid = torch.zeros(hp // f, wp // f, dev.shape[-1], dtype=torch.float64, device=dev.device)
    for start in range(0, qy.numel(), 2048):  # [chunk, n_ring] kernel matrix per chunk: bounded memory
        cy, cx = centre(qy[start:start + 2048]), centre(qx[start:start + 2048])
        d2 = (cy[:, None] - ry).square_() + (cx[:, None] - rx).square_() + soft2
        k = (d2 * d2.sqrt()).reciprocal_()
        grid[qy[start:start + 2048], qx[start:start + 2048]] = (k @ rs) / (k @ rc)[:, None] - mean_dev
    if f > 1:
        grid = F.interpolate(grid.permute(2, 0, 1)[None], size=(hp, wp), mode="bilinear", align_corners=False)[0]
        grid = grid.permute(1, 2, 0)
    return grid[:h, :w]


def histogram_match(geometry_image: Tensor, geometry_mask: Tensor, target: Tensor, ring_width: int) -> Tensor:
    """Per channel, match the histogram of the geometry image inside M_geo to the target on ring(M_geo).

    The reference is the target on the ring around M_geo, the same region as eq. 1's c_tar, so the
    ablation differs from the colour shift only in matching the full distribution instead of the mean.
    Exact CDF matching: a pixel of value v maps to the reference quantile function (the sorted m reference
    values at k/m, k = 1..m, linearly interpolated) at F(v) = fraction of in-mask values <= v. Equal values
    stay equal; with n distinct in-mask values and n reference values the output takes exactly the
    reference values (as skimage.exposure.match_histograms). Outputs are interpolations of target values,
    so no clamp is needed. Pixels outside M_geo are unchanged.
    """
    geometry_mask = _batched_mask(geometry_mask)
    _check_image("geometry image", geometry_image)
    _check_image("target", target)
    b = _common_batch(geometry_image=geometry_image, geometry_mask=geometry_mask, target=target)
    _check_same_size(geometry_image, geometry_mask, "geometry image", "geometry mask")
    _check_same_size(target, geometry_mask, "target", "geometry mask")
    region = binarize(geometry_mask) > 0
    reference = ring(geometry_mask, ring_width) > 0
    _check_ring(geometry_mask, reference, "geometry mask")
    image, target = _expand_batch(geometry_image, b), _expand_batch(target, b)
    region, reference = _expand_batch(region, b), _expand_batch(reference, b)
    out = image.clone(memory_format=torch.contiguous_format)
    for i in range(b):
        values = image[i][region[i]].T  # [C, pixels in M_geo]
        out[i][region[i]] = _match(values, target[i][reference[i]].T.to(image.dtype)).T
    return out


def _match(values: Tensor, reference: Tensor) -> Tensor:
    """Map each row of values [C,n] onto the distribution of the same row of reference [C,m]."""
    values = values.contiguous()
    c, n = values.shape
    m = reference.shape[1]
    ref, _ = reference.sort(dim=1)
    if m == 1:
        return ref.expand(c, n)
    cdf = torch.searchsorted(values.sort(dim=1)[0], values, right=True).to(values.dtype) / n
    ref_q = (torch.arange(1, m + 1, device=values.device, dtype=values.dtype) / m).expand(c, m).contiguous()
    # np.interp(cdf, ref_q, ref): below ref_q[0] it clamps to ref[0]; lerp is exact at both knots.
    hi = torch.searchsorted(ref_q, cdf).clamp(1, m - 1)
    lo = hi - 1
    q_lo, q_hi = ref_q.gather(1, lo), ref_q.gather(1, hi)
    weight = ((cdf - q_lo) / (q_hi - q_lo)).clamp(0.0, 1.0)
    return torch.lerp(ref.gather(1, lo), ref.gather(1, hi), weight)


def _ring_mean(image: Tensor, mask: Tensor, width: int, what: str) -> Tensor:
    mask = _batched_mask(mask)
    _check_image("image", image)
    _check_same_size(image, mask, "image", what)
    b = _common_batch(image=image, mask=mask)
    r = ring(mask, width)
    _check_ring(mask, r, what)
    r = _expand_batch(r, b).to(image.dtype).unsqueeze(-1)  # [B,H,W,1]
    return (image * r).sum(dim=(1, 2)) / r.sum(dim=(1, 2))


def _check_same_size(image: Tensor, mask: Tensor, image_name: str, mask_name: str) -> None:
    if mask.shape[1:] != image.shape[1:3]:
        raise ValueError(
            f"{mask_name} is {_size(mask.shape[1:])} but the {image_name} is {_size(image.shape[1:3])}: "
            "resize the mask to the image (e.g. with ComfyUI's mask/image resize nodes)"
        )


def _check_ring(mask: Tensor, r: Tensor, what: str) -> None:
    h, w = mask.shape[1:]
    for i in range(r.shape[0]):
        if r[i].any():
            continue
        if not (binarize(mask[i]) > 0).any():
            raise ValueError(f"{what} is empty (no value >= 0.5 in the {w}x{h} mask): paint the region")
        raise ValueError(
            f"{what} covers the whole {w}x{h} (WxH) image, so there is no surrounding ring to take the "
            "colour from: leave some of the image unmasked around the region"
        )
