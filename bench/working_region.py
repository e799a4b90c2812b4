"""The working region against the full image: UNet time per step and peak memory of a geometry transfer on a
2048x2048 target whose geometry covers 5 % of it.

The working region (attention/window.py, HA_GeometryImageEdit's working_size 512) runs the model on a window around
the geometry resampled to about 512x512 px; without it the model runs on the whole target. What is measured, per
side, at the latent size each side gives the model:
- one UNet evaluation of the inversion batch (target and geometry rows, Texture-aligning Attention): one DDIM step
  (a step with ReNoise costs `renoise_iterations` of them, the generation's the same order);
- peak memory of that evaluation (GPU: torch.cuda.max_memory_allocated above the level before it; CPU: the peak
  RSS above the level before it, bench/memory.py's sampler);
- the working region's own cost, once: resampling the scene onto the canvas (pipeline.working_scene) and stitching
  the decoded canvas into the 2048 px target (HA_DetailPreservingComposite's window.composite).

Models: `tiny-inpaint` (the tests' SD1.5-shaped UNet with attention at half the latent size: a full-image
evaluation at the 256x256 latent finishes on a CPU) and `sd15` (the real SD1.5 inpainting UNet, random weights: on
a GPU; on a CPU its full-image evaluation takes many minutes, so `--models sd15` there runs the working region only
unless --full is given).

    python bench/working_region.py [--quick] [--cpu] [--models tiny-inpaint,sd15] [--target 2048] [--area 0.05]
"""
from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from memory import _libc, peak_bytes  # noqa: E402


def scene_for(target: int, area: float, working_size: int):
    """A `target` px square scene whose geometry is a centred disc of `area` of the image (source = target size)."""
    import torch

    from harmonizing_attention.nodes.pipeline import Scene

    y, x = torch.meshgrid(torch.arange(target), torch.arange(target), indexing="ij")
    radius = math.sqrt(area * target * target / math.pi)
    disc = (((x - target / 2 + 0.5) ** 2 + (y - target / 2 + 0.5) ** 2) <= radius ** 2).float()[None]
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, target, target, 3, generator=gen)
    return Scene(source=image, source_mask=disc, target=image, geometry=image, geometry_mask=disc,
                 working_size=working_size)


def build(name: str, device):
    import harness

    if name == "tiny-inpaint":  # tests/conftest.py's: attention at the half-size level only
        return harness.tiny_model(in_channels=9, seed=1, transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1])
    return common.build_model(name, device)


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--target", type=int, default=None, help="target side in px (default 2048; --quick 1024)")
    p.add_argument("--area", type=float, default=0.05, help="the geometry's share of the target's area")
    p.add_argument("--working-size", type=int, default=512)
    p.add_argument("--full", action="store_true", help="time sd15's full-image side on a CPU too (minutes per call)")
    args = p.parse_args(argv)
    libc = _libc()
    device = common.start(args.cpu, args.threads)
    import torch

    from harmonizing_attention.attention import window as wr
    from harmonizing_attention.nodes.patch import apply_plan
    from harmonizing_attention.nodes.pipeline import working_scene
    from attention_overhead import plan_for

    target = args.target or (1024 if args.quick else 2048)
    repeats = args.repeats or (1 if args.quick else 3)
    models = [m.strip() for m in args.models.split(",")] if args.models else (
        ["tiny-inpaint"] if args.quick or device.type != "cuda" else ["tiny-inpaint", "sd15"])
    scene = scene_for(target, args.area, args.working_size)
    win = scene.window
    ch, cw = win.canvas_hw
    if ch != cw:
        raise SystemExit(f"the canvas is {cw}x{ch}: this bench times square latents (a centred disc gives one)")
    clock = common.clock
    t0 = clock()
    work = working_scene(scene, 8)
    t_crop = clock() - t0
    decoded = work.target
    t0 = clock()
    out, band = wr.composite(decoded, scene.target, scene.geometry_mask, win)
    t_stitch = clock() - t0
    print(f"# working region on {common.describe(device)}: {target}x{target} target, geometry {args.area:.0%} of it; "
          f"{win.describe()}; median of {repeats}", flush=True)
    print(f"  working_scene (crop + resample): {t_crop:.3f} s; stitch + composite at {target} px: {t_stitch:.3f} s")
    sides = {"working region": ch // 8, "full image": target // 8}
    rows, speedups, mem_ratios = [], [], []
    for name in models:
        patcher = build(name, device)
        calls = {}
        for side, size in sides.items():
            if side == "full image" and name == "sd15" and device.type != "cuda" and not args.full:
                print(f"  {name} full image: skipped on the CPU (--full to time it)", flush=True)
                continue
            plan = plan_for("texture_aligning", size)
            calls[side] = lambda f=common.Forward(patcher, plan.rows, size, device), m=apply_plan(patcher, plan): f(m)
        times = common.interleaved(calls, repeats, device)  # the sides alternate: load drifts hit both alike
        result = {}
        for side, call in calls.items():
            size = sides[side]
            peak = peak_bytes(call, device, libc)
            t = statistics.median(times[side])
            result[side] = (t, peak)
            rows.append([name, side, f"{size}x{size}", f"{t:.3f}", f"{peak / 2**20:.0f}"])
            print(f"  {name} {side} (latent {size}x{size}): {t:.3f} s per UNet call ({common.mmm(times[side])}), "
                  f"peak {peak / 2**20:.0f} MiB", flush=True)
        if len(result) == 2:
            speedups.append(result["full image"][0] / result["working region"][0])
            mem_ratios.append(result["full image"][1] / max(1, result["working region"][1]))
            rows.append([name, "full / region", "", f"{speedups[-1]:.1f}x", f"{mem_ratios[-1]:.1f}x"])
        del patcher
        torch.cuda.empty_cache() if device.type == "cuda" else None
    print()
    print(common.table(["model", "side", "latent", "s per UNet call (2 rows)", "peak MiB"], rows))
    if speedups:
        print(f"working_region_speedup={speedups[0]:.1f} working_region_memory_ratio={mem_ratios[0]:.1f} "
              f"target={target} canvas={cw}x{ch} model={models[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
