"""Realistic region masks at 512 px for the mask -> latent cells -> tokens rule (tests and bench/mask_coverage.py):
cracks 2-3 px wide, a 1-px line, a horizontal 3-px scratch across a latent row boundary, dotted droplets, the
shipped blob mask and a large region. Each is a float [H, W] tensor of 0 / 1, built deterministically."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SIZE = 512
EXAMPLES = Path(__file__).resolve().parents[1] / "example_images"


def polyline(points, width: float, size: int = SIZE) -> torch.Tensor:
    """Pixels whose centre lies within width / 2 of the polyline through `points` ((x, y) pixel coordinates)."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    dist = np.full((size, size), np.inf)
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=False):
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy), 0, 1)
        dist = np.minimum(dist, np.hypot(x - x0 - t * dx, y - y0 - t * dy))
    return torch.from_numpy((dist <= width / 2).astype(np.float32))


def crack_path(seed: int = 0, steps: int = 24):
    """A wandering diagonal crack from near the top-left to near the bottom-right."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, steps)
    x = 60 + 390 * t + np.cumsum(rng.normal(0, 6, steps))
    y = 70 + 370 * t + np.cumsum(rng.normal(0, 6, steps))
    return list(zip(x, y, strict=True))


def droplets(seed: int = 0, count: int = 40, size: int = SIZE) -> torch.Tensor:
    """Dots of radius 2-6 px scattered over a 220 px square (ink droplets)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] + 0.5
    m = np.zeros((size, size), dtype=bool)
    for cx, cy, r in zip(rng.uniform(150, 370, count), rng.uniform(150, 370, count), rng.uniform(2, 6, count), strict=True):
        m |= np.hypot(x - cx, y - cy) <= r
    return torch.from_numpy(m.astype(np.float32))


def ellipse(cx: float, cy: float, ax: float, ay: float, size: int = SIZE) -> torch.Tensor:
    y, x = np.mgrid[0:size, 0:size] + 0.5
    return torch.from_numpy((((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1).astype(np.float32))


def shipped_blob() -> torch.Tensor:
    """example_images/crack_mask.png as LoadImageMask (red channel) then the pack's binarize give it."""
    from PIL import Image

    m = np.asarray(Image.open(EXAMPLES / "crack_mask.png").convert("RGB"))[..., 0]
    return torch.from_numpy((m / 255.0 >= 0.5).astype(np.float32))


EIGHT = np.ones((3, 3), dtype=bool)


def lost_and_broken(mask: torch.Tensor, selected: torch.Tensor) -> tuple[int, int, int]:
    """(connected parts of the mask (8-connected pixels), parts with no selected cell, parts whose selected cells
    are not one 8-connected set). mask [H, W]; selected bool [h, w]; pixel y lies in cell row y * h // H."""
    from scipy import ndimage

    labels, n = ndimage.label(mask.numpy() > 0, structure=EIGHT)
    (h, w), (H, W) = selected.shape, mask.shape
    cy, cx = np.arange(H) * h // H, np.arange(W) * w // W
    lost = broken = 0
    for k in range(1, n + 1):
        grid = np.zeros((h, w), dtype=bool)
        ys, xs = np.nonzero(labels == k)
        grid[cy[ys], cx[xs]] = True
        pieces = ndimage.label(grid & selected.numpy(), structure=EIGHT)[1]
        lost += pieces == 0
        broken += pieces > 1
    return n, lost, broken


def masks() -> dict[str, torch.Tensor]:
    return {
        "crack 2 px": polyline(crack_path(0), 2.0),
        "crack 3 px": polyline(crack_path(1), 3.0),
        "line 1 px": polyline([(40.0, 300.0), (470.0, 140.0)], 1.0),
        "scratch 3 px": polyline([(40.0, 256.5), (470.0, 256.5)], 3.0),  # rows 255-257: across a latent row edge
        "droplets": droplets(),
        "blob (shipped)": shipped_blob(),
        "large": ellipse(250.0, 270.0, 190.0, 150.0),
    }
