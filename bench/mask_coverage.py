"""Which latent cells / attention tokens stand for a region, by rule, per layer resolution and mask kind.

For each realistic 512 px mask (tests/thin_masks.py) and each SD1.5 layer size at 512 px (64 = the latent,
32, 16, 8) it prints, per rule, the cells selected, their mean and least coverage (fraction of the cell inside
the mask), how many of them are mostly outside the mask, and, of the mask's connected parts (8-connected
pixels), how many the selection loses (no cell left) or breaks (its cells fall apart into 8-connected pieces):

- touched:  coverage > 0 (the tokens before issue 11)
- majority: coverage >= 0.5 (eq. 4's blend before issue 11)
- comfy:    ComfyUI's inpainting concat_mask resize, bilinear then round (at the latent size only)
- rule:     attention/tokens.py's rule (now the blend, the inpainting mask channel and the tokens)

Pure tensor work on the CPU, a few seconds:  python bench/mask_coverage.py [--quick] [--markdown]
(--markdown: one row per mask and layer, each rule as "cells · mean coverage · parts lost/broken"; --quick: the
64 and 32 layers only). The last line: the mask parts that each rule loses over every mask and layer.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

PACK_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PACK_ROOT / "tests"))
sys.path.insert(0, str(PACK_ROOT / "scripts"))
import comfy_runtime  # noqa: E402

comfy_runtime.as_package()

from harmonizing_attention.attention.tokens import cells, coverage  # noqa: E402
from thin_masks import lost_and_broken, masks  # noqa: E402

SIZES = (64, 32, 16, 8)
FORMAT = "{:<15} {:>6} {:>5} {:<9} {:>6} {:>8} {:>8} {:>8} {:>6} {:>5} {:>6}"


def rules(mask: torch.Tensor, size: int) -> dict[str, torch.Tensor]:
    c = coverage(mask[None], size, size)[0]
    out = {"touched": c > 0, "majority": c >= 0.5}
    if size == SIZES[0]:
        out["comfy"] = F.interpolate(mask[None, None], size=(size, size), mode="bilinear")[0, 0].round() > 0
    out["rule"] = cells(mask[None], size, size)[0]
    return out


def measure(sizes=SIZES):
    """(mask name, pixels, layer size, rule, cells, mean coverage, least coverage, cells < 0.5, parts, lost, broken)."""
    for name, mask in masks().items():
        for size in sizes:
            c = coverage(mask[None], size, size)[0]
            for rule, sel in rules(mask, size).items():
                picked = c[sel]
                yield (name, int(mask.sum()), size, rule, int(sel.sum()),
                       float(picked.mean()) if picked.numel() else None, float(picked.min()) if picked.numel() else None,
                       int((picked < 0.5).sum()), *lost_and_broken(mask, sel))


def table(results: list) -> list[str]:
    lines = [FORMAT.format("mask", "px", "layer", "rule", "cells", "mean cov", "min cov", "cov<0.5", "parts", "lost",
                           "broken")]
    for name, px, size, rule, n, mean, least, outside, parts, lost, broken in results:
        lines.append(FORMAT.format(name, px, f"{size}x{size}", rule, n, "-" if mean is None else f"{mean:.2f}",
                                   "-" if least is None else f"{least:.3f}", outside, parts, lost, broken))
    return lines


def markdown(results: list) -> list[str]:
    """One row per mask and layer; each rule as 'cells, mean coverage, parts lost / broken'."""
    rows: dict = {}
    for name, px, size, rule, n, mean, _, _, parts, lost, broken in results:
        cell = f"{n} · {'-' if mean is None else f'{mean:.2f}'} · {lost}/{broken}"
        rows.setdefault((f"{name} ({px} px, {parts} part{'s' if parts > 1 else ''})", f"{size}x{size}"), {})[rule] = cell
    lines = ["| mask | layer | tokens before (cov > 0) | blend before (cov >= 0.5) | inpaint mask before (ComfyUI "
             "resize) | the rule: blend = inpaint mask = tokens |", "|---|---|---|---|---|---|"]
    for (name, layer), r in rows.items():
        lines.append(f"| {name} | {layer} | {r['touched']} | {r['majority']} | {r.get('comfy', '')} | {r['rule']} |")
    return lines


def headline(results: list) -> str:
    lost: dict[str, int] = {}
    for _, _, _, rule, *_, parts_lost, _ in results:
        lost[rule] = lost.get(rule, 0) + parts_lost
    return "mask_coverage_rule_parts_lost={} ".format(lost.pop("rule")) + " ".join(
        f"{rule}_parts_lost={n}" for rule, n in lost.items())


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--markdown", action="store_true", help="the compact Markdown table of docs/method.md")
    p.add_argument("--quick", action="store_true", help="the 64 and 32 layers only")
    args = p.parse_args()
    results = list(measure(SIZES[:2] if args.quick else SIZES))
    print("\n".join(markdown(results) if args.markdown else table(results)))
    print(headline(results))
