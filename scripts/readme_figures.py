"""Two figures of docs/beyond-the-paper.md: the regional colour shift on a left-to-right gradient target
(docs/regional_colour.png), and the reference share of Geometry-preserving Attention against the region's size,
paper vs auto balance (docs/balance_share.png). Pure tensor work on the CPU, no model.

    python scripts/readme_figures.py   (from the pack root, in an environment with torch, e.g. the test venv)
"""
import sys
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.modules["harmonizing_attention"] = types.ModuleType("harmonizing_attention")
sys.modules["harmonizing_attention"].__path__ = [str(ROOT)]
from harmonizing_attention.attention import color, edit  # noqa: E402
from harmonizing_attention.attention.kv import shared_attention  # noqa: E402
from harmonizing_attention.attention.roles import PairLayout, balance, geometry_preserving_rules  # noqa: E402


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
    out = ROOT / "docs" / "regional_colour.png"
    canvas.save(out)
    print(f"wrote {out}")
    for name, image in (("eq1", eq1), ("regional", regional)):
        means = [float(image[0, inside[:, c], c, 0].mean()) for c in cols[:: max(1, len(cols) // 6)].tolist()]
        print(name, "red column means left->right:", [round(m, 3) for m in means])


def share(fraction, mode, weight=1.0, n=4096, heads=2):
    """The source's share of an output query's attention with equal keys (all logits 0), measured through
    kv.shared_attention with PyTorch's SDPA: values 1 on the source, 0 on the output row."""
    def kernel(q, k, v, mask=None):
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
        return out.transpose(1, 2).reshape(q.shape)

    q = k = torch.zeros(2, n, 8)
    v = torch.stack([torch.ones(n, 8), torch.zeros(n, 8)])
    region = torch.arange(n) < max(1, round(fraction * n))
    rules = geometry_preserving_rules(PairLayout(1, 1), balance=balance(mode, weight))
    return float(shared_attention(q, k, v, rules, kernel, {0: region, 1: torch.zeros(n, dtype=torch.bool)})[1, 0, 0])


def share_figure():
    fractions = [0.005 * 1.25 ** i for i in range(22)]  # 0.5% .. ~54%
    curves = [("paper (w = 1)", "paper", 1.0, (200, 0, 0)), ("auto", "auto", 1.0, (0, 0, 200)),
              ("auto, balance_weight 2", "auto", 2.0, (0, 140, 0)), ("manual w = 3", "manual", 3.0, (150, 100, 0))]
    canvas = Image.new("RGB", (640, 400), "white")
    draw = ImageDraw.Draw(canvas)
    x0, x1, y0, y1 = 60, 620, 30, 360
    draw.rectangle([x0, y0, x1, y1], outline="black")
    lx0, lx1 = np.log(fractions[0]), np.log(fractions[-1])
    px = lambda f, s: (x0 + (x1 - x0) * (np.log(f) - lx0) / (lx1 - lx0), y1 - (y1 - y0) * s / 0.6)  # noqa: E731
    for s in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5):
        draw.text((20, px(fractions[0], s)[1] - 5), f"{s:.0%}", fill="black")
    for f in (0.01, 0.1, 0.4):
        draw.line([px(f, 0), px(f, 0.6)], fill=(210, 210, 210))
        draw.text((px(f, 0)[0] - 10, y1 + 5), f"{f:.0%}", fill="black")
    for i, (name, mode, weight, rgb) in enumerate(curves):
        values = [share(f, mode, weight) for f in fractions]
        draw.line([px(f, s) for f, s in zip(fractions, values, strict=True)], fill=rgb, width=3)
        draw.text((x0 + 10, y0 + 8 + 14 * i), name, fill=rgb)
        print(name, "share at 1% / 40%:", round(share(0.01, mode, weight), 4), round(share(0.40, mode, weight), 4))
    draw.text((x0 + 150, 8), "source share of attention (equal logits) vs region size (log scale)", fill="black")
    out = ROOT / "docs" / "balance_share.png"
    canvas.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
    share_figure()
