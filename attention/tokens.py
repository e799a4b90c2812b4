"""One rule from a pixel mask to the cells of any coarser grid: the latent (eq. 4's blend, an inpainting
model's mask channel) and every self-attention layer's tokens (eqs. 5-7).

The rule works on the coverage map, the fraction of each cell that the mask covers (area resampling):

1. anchors: the cells holding at least half as much of the mask as the fullest cell around them,
   ``coverage >= 0.5 * max(coverage over the 3x3 cells around)`` (and > 0). Inside a region wider than
   a cell that is the majority rule, coverage >= 0.5; along a structure thinner than a cell (a crack,
   a scratch, a dot) it keeps the cells the structure runs through and drops those it only grazes.
2. connectors: starting from every cell the mask touches (coverage > 0), the touched cells that are not
   anchors are removed one at a time, least covered first, while removing one keeps the topology
   (a simple cell: 8-connected regions, 4-connected holes). What stays joins the anchors exactly as
   the mask joins them at this grid's scale.

So a non-empty mask never becomes empty (each connected part keeps its fullest cell), a crack stays one
8-connected chain of cells at every resolution, rings keep their holes, and every cell the mask covers
at least half is in. Cells mostly outside the mask appear only along structures thinner than a cell,
where no cell is mostly inside; notes/README-issue-11.md has the figures per layer and mask kind.
"""
from __future__ import annotations

import heapq

import torch
import torch.nn.functional as F


def coverage(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Fraction of each (h, w) cell covered by the mask: [B, H, W] -> [B, h, w] (area resampling)."""
    return F.adaptive_avg_pool2d(mask[:, None].float(), (h, w))[:, 0]


# The 8 neighbours in Yokoi's order (E, NE, N, NW, W, SW, S, SE) as (dy, dx).
_RING = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))


def _simple(inside: bytearray, p: int, offsets: tuple[int, ...]) -> bool:
    """Removing cell p keeps the number of 8-connected parts and 4-connected holes: Yokoi's 8-connectivity
    number is 1 (isolated and interior cells give 0, cells joining two parts 2 or more)."""
    out = [1 - inside[p + o] for o in offsets]
    return sum(out[k] - out[k] * out[k + 1] * out[(k + 2) % 8] for k in (0, 2, 4, 6)) == 1


def _cells_one(c: torch.Tensor) -> torch.Tensor:
    """The rule on one coverage map c [h, w] (CPU): bool [h, w]."""
    h, w = c.shape
    touched = c > 0
    anchors = touched & (c >= 0.5 * F.max_pool2d(c[None, None], 3, stride=1, padding=1)[0, 0])
    candidates = (touched & ~anchors).nonzero().tolist()
    if not candidates:
        return touched
    # a 1-cell border of background around the grid, cells indexed row-major in it
    stride = w + 2
    offsets = tuple(dy * stride + dx for dy, dx in _RING)
    inside = bytearray(F.pad(touched.to(torch.uint8), (1, 1, 1, 1)).flatten().tolist())
    removable = bytearray(len(inside))
    cov = F.pad(c, (1, 1, 1, 1)).flatten().tolist()
    heap = []
    for y, x in candidates:
        p = (y + 1) * stride + x + 1
        removable[p] = 1
        heap.append((cov[p], p))
    heapq.heapify(heap)
    while heap:
        _, p = heapq.heappop(heap)
        if not inside[p] or not _simple(inside, p, offsets):
            continue  # a cell kept now is pushed again if a neighbour's removal makes it simple
        inside[p] = 0
        for o in offsets:
            q = p + o
            if inside[q] and removable[q]:
                heapq.heappush(heap, (cov[q], q))
    grid = torch.tensor(list(inside), dtype=torch.bool).view(h + 2, w + 2)
    return grid[1:-1, 1:-1]


def cells(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The cells of an (h, w) grid that stand for the mask, by the module's rule: [B, H, W] -> bool [B, h, w]."""
    c = coverage(mask, h, w).cpu()
    return torch.stack([_cells_one(m) for m in c]).to(mask.device)


def region_tokens(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Tokens of an (h, w) layer that stand for the region: [B, H, W] -> bool [B, h * w]. The same cells as
    latent_mask at the latent's size; at each coarser layer, the same rule on that layer's coverage."""
    return cells(mask, h, w).flatten(1)


def latent_mask(mask: torch.Tensor, h: int, w: int, feather: float = 0.0) -> torch.Tensor:
    """The mask at latent resolution, for eq. 4 and an inpainting model's mask channel: [B, H, W] -> [B, 1, h, w].

    Binary, by the module's rule: a blended cell is a whole inverted latent of one image, never a mix of two
    (a mix w * z_geo + (1 - w) * z_tar of two independent noises has the variance w^2 + (1 - w)^2 < 1 of the
    noise the schedule expects). `feather` > 0 blurs that binary mask with a Gaussian of that standard
    deviation in latent pixels (eq. 4 only; the inpainting channel stays binary).
    """
    m = cells(mask, h, w).to(torch.float32)[:, None]
    if feather > 0:
        radius = max(1, int(3 * feather + 0.5))
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        g = torch.exp(-0.5 * (x / feather) ** 2)
        g = (g / g.sum()).to(m)
        m = F.pad(m, (radius, radius, radius, radius), mode="replicate")
        m = F.conv2d(m, g.view(1, 1, 1, -1))
        m = F.conv2d(m, g.view(1, 1, -1, 1))
    return m


def blend(z_geo: torch.Tensor, z_tar: torch.Tensor, m_geo: torch.Tensor) -> torch.Tensor:
    """Eq. 4: z_out = z_geo * m_geo + z_tar * (1 - m_geo)."""
    return z_geo * m_geo + z_tar * (1 - m_geo)
