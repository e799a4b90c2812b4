"""One rule from a pixel mask to the cells of a coarser grid: the latent (eq. 4's blend and an inpainting
model's mask channel) and every self-attention layer's tokens (eqs. 5-7).

The rule reads the coverage map (the fraction of each cell the mask covers, area resampling) and the mask's
connected parts (8-connected pixels). A cell is kept when it is

1. an anchor:
   - covered at least half (coverage >= 0.5), or
   - holding more than half as much of the mask as the fullest of the 3x3 cells around it, or
   - the cell holding most pixels of one connected part of the mask;
2. or a connector: from all the cells the mask touches (coverage > 0), the non-anchors are removed one at a
   time, least covered first, whenever each connected part of the mask in them keeps its other cells around
   them joined without them; what cannot go joins the anchors of one part.

What that gives, at every resolution:
- no connected part of the mask is lost (so a non-empty mask never becomes empty), and the kept cells of each
  part are 8-connected: a crack is one unbroken chain of cells;
- every cell covered at least half is kept; a region wider than a cell gets exactly the cells it covers at
  least half (the majority rule, eq. 4 as published);
- a cell mostly outside the mask is kept only along structures thinner than a cell, where no cell is mostly
  inside: the cells the structure runs through, not those it grazes (bench/mask_coverage.py prints the figures
  per layer and mask kind).
"""
from __future__ import annotations

import heapq

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage  # a ComfyUI dependency (comfy/samplers.py imports scipy)


def coverage(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Fraction of each (h, w) cell covered by the mask: [B, H, W] -> [B, h, w] (area resampling)."""
    return F.adaptive_avg_pool2d(mask[:, None].float(), (h, w))[:, 0]


# the 8 neighbours of a cell as (dy, dx)
_RING = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))


def _parts_per_cell(inside: torch.Tensor, h: int, w: int) -> tuple[dict[int, frozenset], set[int]]:
    """The mask's 8-connected parts seen from the cells: (cell -> the parts with pixels in it, the cell holding
    most pixels of each part). Cells are flat indices in an (h + 2, w + 2) grid with a border; pixel y lies in
    cell row y * h // H (x likewise). inside: bool [H, W]."""
    H, W = inside.shape
    labels, count = ndimage.label(inside.numpy(), structure=np.ones((3, 3), dtype=bool))
    labels = torch.from_numpy(labels).long()
    cell = (torch.arange(H) * h // H + 1)[:, None] * (w + 2) + (torch.arange(W) * w // W + 1)[None, :]
    found, counts = (cell[inside] * (count + 1) + labels[inside]).unique(return_counts=True)
    parts: dict[int, set] = {}
    fullest: dict[int, tuple[int, int]] = {}
    for key, n in zip(found.tolist(), counts.tolist(), strict=True):
        c, label = divmod(key, count + 1)
        parts.setdefault(c, set()).add(label)
        if n > fullest.get(label, (0, 0))[0]:
            fullest[label] = (n, c)
    return {c: frozenset(s) for c, s in parts.items()}, {c for _, c in fullest.values()}


def _cells_one(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The rule for one mask [H, W] (CPU): bool [h, w]."""
    c = coverage(mask[None], h, w)[0]
    touched = c > 0
    anchors = touched & ((c >= 0.5) | (c > 0.5 * F.max_pool2d(c[None, None], 3, stride=1, padding=1)[0, 0]))
    stride = w + 2  # cells indexed row-major in the grid with a 1-cell border of background
    parts, fullest = _parts_per_cell(mask > 0, h, w)
    for p in fullest:
        anchors[p // stride - 1, p % stride - 1] = True
    candidates = (touched & ~anchors).nonzero().tolist()
    if not candidates:
        return touched
    offsets = tuple(dy * stride + dx for dy, dx in _RING)
    kept = bytearray(F.pad(touched.to(torch.uint8), (1, 1, 1, 1)).flatten().tolist())
    removable = bytearray(len(kept))
    cov = F.pad(c, (1, 1, 1, 1)).flatten().tolist()
    heap = []
    for y, x in candidates:
        p = (y + 1) * stride + x + 1
        removable[p] = 1
        heap.append((cov[p], p))
    heapq.heapify(heap)

    def removable_now(p: int) -> bool:
        """For each part of the mask in p, its kept cells around p stay joined without p (so, by induction, each
        part's kept cells stay one 8-connected set), and p is not the part's last cell."""
        around = [q for q in (p + o for o in offsets) if kept[q]]
        for part in parts.get(p, ()):
            holding = [q for q in around if part in parts.get(q, ())]
            if not holding:
                return False
            group, todo = {holding[0]}, [holding[0]]
            while todo:
                a = todo.pop()
                for b in holding:
                    if b not in group and abs(a // stride - b // stride) <= 1 and abs(a % stride - b % stride) <= 1:
                        group.add(b)
                        todo.append(b)
            if len(group) < len(holding):
                return False
        return True

    while heap:
        _, p = heapq.heappop(heap)
        if not kept[p] or not removable_now(p):
            continue  # a cell kept now is pushed again when a neighbour's removal changes its surroundings
        kept[p] = 0
        for o in offsets:
            q = p + o
            if kept[q] and removable[q]:
                heapq.heappush(heap, (cov[q], q))
    return torch.tensor(list(kept), dtype=torch.bool).view(h + 2, w + 2)[1:-1, 1:-1]


def cells(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The cells of an (h, w) grid that stand for the mask, by the module's rule: [B, H, W] -> bool [B, h, w]."""
    return torch.stack([_cells_one(m, h, w) for m in mask.detach().float().cpu()]).to(mask.device)


def summary(mask: torch.Tensor, h: int, w: int) -> list[tuple[int, float, float]]:
    """Per row of [B, H, W]: (cells kept by the rule, the mask's area in cells, the kept cells' mean coverage)."""
    c = coverage(mask, h, w)
    kept = cells(mask, h, w)
    return [(int(k.sum()), float(r.sum()), float(r[k].mean()) if k.any() else 0.0) for r, k in zip(c, kept, strict=True)]


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
