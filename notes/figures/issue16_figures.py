"""Figures for notes/README-issue-16.md: the regional colour shift on a left-to-right gradient target.

    python notes/figures/issue16_figures.py   (from the pack root, with the test venv's python)
"""
import sys
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[2]
sys.modules["harmonizing_attention"] = types.ModuleType("harmonizing_attention")
sys.modules["harmonizing_attention"].__path__ = [str(ROOT)]
from harmonizing_attention.attention import color, edit  # noqa: E402


def load(name, mode="RGB"):
    return torch.from_numpy(np.asarray(Image.open(ROOT / "example_images" / name).convert(mode), dtype=np.float32) / 255)


def to_pil(image):
    return Image.fromarray((image.clamp(0, 1).numpy() * 255).round().astype(np.uint8))


def main():
    source, mask = load("crack_source.png")[None], load("crack_mask.png", "L")[None]
    mask = edit.binarize(mask)
    h, w = mask.shape[1:]
    x = torch.linspace(0, 1, w)
    # warm light on the left, cold on the right, a little brick-like texture
    target = torch.stack([0.85 - 0.55 * x, 0.55 - 0.1 * x, 0.25 + 0.55 * x], -1).expand(1, h, w, 3).clone()
    target += 0.04 * torch.sin(torch.arange(h)[:, None, None] / 3.0)
    # a wide placement: the patch scaled up so it spans a good part of the gradient
    geometry, geo_mask = edit.place_source(source, mask, target.clamp(0, 1), edit.Placement(scale=3.0))
    target = target.clamp(0, 1)
    eq1 = color.mean_shift(geometry, geo_mask, source, mask, target, 1.0, 8)
    regional = color.regional_shift(geometry, geo_mask, source, mask, target, 1.0, 8)

    panels = [("target", target), ("pasted (no shift)", geometry), ("eq. 1 mean_shift, a=1", eq1),
              ("regional, a=1", regional)]
    scale = 0.5
    pw, ph = int(w * scale), int(h * scale)
    plot_h = 220
    canvas = Image.new("RGB", (pw * len(panels), ph + 20 + plot_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, image) in enumerate(panels):
        canvas.paste(to_pil(image[0]).resize((pw, ph)), (i * pw, 20))
        draw.text((i * pw + 4, 4), title, fill="black")
    # column means of each channel inside the mask: the patch's local colour against x
    inside = geo_mask[0] > 0
    cols = torch.nonzero(inside.any(0)).flatten()
    x0, x1 = 40, canvas.width - 20
    y0, y1 = ph + 30, canvas.height - 20

    lo, hi = 0.2, 0.9

    def px(col, value):
        return x0 + (x1 - x0) * col / (w - 1), y1 - (y1 - y0) * (value - lo) / (hi - lo)

    draw.rectangle([x0, y0, x1, y1], outline="black")
    draw.text((4, y0), f"{hi}", fill="black")
    draw.text((4, y1 - 10), f"{lo}", fill="black")
    for name, image, style in (("target ring", target, 1), ("eq. 1", eq1, 2), ("regional", regional, 3)):
        for c, rgb in enumerate(((200, 0, 0), (0, 140, 0), (0, 0, 200))):
            pts = []
            for col in cols.tolist():
                rows = inside[:, col]
                pts.append(px(col, float(image[0, rows, col, c].mean() if name != "target ring" else image[0, 0, col, c])))
            if style == 1:
                draw.line(pts, fill=rgb, width=1)
            elif style == 2:
                for p in pts[::6]:
                    draw.rectangle([p[0] - 1, p[1] - 1, p[0] + 1, p[1] + 1], fill=rgb)
            else:
                draw.line(pts, fill=rgb, width=3)
    draw.text((x0 + 6, y0 + 4), "patch column means per channel vs x: thin = target, dots = eq. 1 (flat), "
              "thick = regional (follows the gradient)", fill="black")
    out = ROOT / "notes" / "figures" / "issue16_regional_colour.png"
    canvas.save(out)
    print(f"wrote {out}")
    for name, image in (("eq1", eq1), ("regional", regional)):
        means = [float(image[0, inside[:, c], c, 0].mean()) for c in cols[:: max(1, len(cols) // 6)].tolist()]
        print(name, "red column means left->right:", [round(m, 3) for m in means])


if __name__ == "__main__":
    main()
