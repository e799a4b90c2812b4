"""Masks at the resolution of a layer (tokens) or of the latent."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def coverage(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Fraction of each (h, w) cell covered by the mask: [B, H, W] -> [B, h, w] (area resampling)."""
    return F.adaptive_avg_pool2d(mask[:, None].float(), (h, w))[:, 0]


def region_tokens(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Tokens of an (h, w) layer that the mask touches: [B, H, W] -> bool [B, h * w].

    The paper keeps the tokens where the resized mask is non-zero (eq. 6-7); with area resampling
    that is every cell the region overlaps, so a thin crack keeps its tokens at every layer.
    """
    return (coverage(mask, h, w) > 0).flatten(1)


def latent_mask(mask: torch.Tensor, h: int, w: int, feather: float = 0.0) -> torch.Tensor:
    """The geometry mask at latent resolution for eq. 4: [B, H, W] -> [B, 1, h, w].

    Binary (a cell belongs to the region when the region covers at least half of it); `feather` > 0
    blurs that binary mask with a Gaussian of that standard deviation in latent pixels.
    """
    m = (coverage(mask, h, w) >= 0.5).float()[:, None]
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
