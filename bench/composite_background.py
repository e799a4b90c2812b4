"""Background fidelity with and without the detail-preserving composite, through scripts/evaluate.py's protocol.

Runs evaluate.evaluate (the crack example onto the brick and hazelnut targets) twice, plain decode and with
--composite, and prints its pixel metrics (PSNR / MSE against the naive composite, fMSE inside M_geo) plus the
background PSNR (output vs target, M_geo blacked out in both, as the (bg) metrics compare them) and the share of
background pixels equal to the target.

    python bench/composite_background.py [--quick] [--ckpt tiny|PATH] [--size 256] [--steps 4] [--cpu]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="128 px, 2 steps (default size and steps: 256 px, 4)")
    p.add_argument("--ckpt", default="tiny", help="tiny: the tests' random SD1.5-inpainting checkpoint file")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--iterations", type=int, default=1)
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args()
    args.size = args.size or (128 if args.quick else 256)
    args.steps = args.steps or (2 if args.quick else 4)
    common.start(args.cpu, threads=1)
    import evaluate
    from harmonizing_attention.attention import composite, edit, metrics

    if args.ckpt == "tiny":
        import comfy_server

        args.ckpt = str(comfy_server.tiny_checkpoint(9))
    model, clip, vae = evaluate.load_checkpoint(args.ckpt)
    ex = common.PACK_ROOT / "example_images"
    folder = Path(tempfile.mkdtemp(prefix="ha-composite-bench-"))
    (folder / "src").mkdir()
    (folder / "tar").mkdir()
    for name in ("crack_source.png", "crack_mask.png"):
        (folder / "src" / name.replace("crack_source", "crack")).write_bytes((ex / name).read_bytes())
    for name in ("target_brick.png", "target_hazelnut.png"):
        (folder / "tar" / name).write_bytes((ex / name).read_bytes())
    sources = evaluate.load_sources(folder / "src", None, args.size)
    targets = evaluate.load_targets(folder / "tar", args.size)
    base = evaluate.Settings(size=args.size, steps=args.steps, iterations=args.iterations)
    print("| variant | target | PSNR | MSE | fMSE | PSNR(bg) | bg pixels == target | band px |")
    print("|---|---|---|---|---|---|---|---|")
    background = {}  # (variant, target) -> (PSNR(bg), share of background pixels equal to the target)
    for label, composite_on in (("decode", False), ("composite", True)):
        settings = evaluate.Settings(**{**base.__dict__, "composite": composite_on})
        result = evaluate.evaluate(model, clip, vae, sources, targets, folder / label, settings, metric_names=(),
                                   log=lambda *_: None)
        _, source, mask = sources[0]
        for (t_name, target), row in zip(targets, result["rows"], strict=True):
            out = result["composites"][("crack", t_name)]
            _, geo_mask = edit.place_source(source, mask, target, evaluate.placement_for(settings, mask, edit))
            bg = metrics.psnr(metrics.background(out, geo_mask), metrics.background(target, geo_mask)).item()
            outside = geo_mask[0] < 0.5
            same = (out[0][outside] == target[0][outside]).all(dim=-1).float().mean().item()
            band = int(composite.blend_band(geo_mask, base.composite_feather, base.composite_levels).sum()) \
                if composite_on else 0
            background[label, t_name] = bg, same
            print(f"| {label} | {t_name} | {row['psnr']:.2f} | {row['mse']:.2f} | {row['fmse']:.2f} | {bg:.2f} | "
                  f"{100 * same:.1f}% | {band} |")
        del result
    print(f"\n{args.size} px, {args.steps} steps, {args.iterations} ReNoise iteration(s); checkpoint {Path(args.ckpt).name}; "
          f"composite feather {base.composite_feather:g} px, {base.composite_levels} levels")
    gain = min(background["composite", t][0] - background["decode", t][0] for _, t in background)
    equal = min(share for (label, _), (_, share) in background.items() if label == "composite")
    print(f"composite_background_bg_psnr_gain_min={gain:.2f} composite_bg_pixels_equal_min={100 * equal:.1f}%")


if __name__ == "__main__":
    main()
