"""Cost of a whole geometry transfer against the UNet evaluations it needs.

Runs pipeline.invert -> blend_latents -> generate (the functions the nodes call, through ComfyUI's
sampler) on one (source, target) pair, counts the UNet evaluations and their batch sizes (an
APPLY_MODEL wrapper), and divides the wall time by sum(evaluations x plain evaluation time at that
batch). Each patched evaluation gets a plain twin: the wrapper runs a plain forward of the same batch size
right after it (its time is taken out of the pipeline's wall time), so load drifts on a shared machine hit
both sides alike. `pipeline / UNet` includes the VAE encodes of the
inversion (images and masked images); `minus VAE` subtracts them (measured in the same round), leaving
the attention patches, the sampler, conditioning and inversion arithmetic.

    python bench/pipeline_overhead.py [--quick] [--cpu] [--models tiny,sd15]
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def scene(size: int):
    """A (noise source, checker target) pair at size x size pixels, a box mask moved right by size/8."""
    import harness
    import torch
    from harmonizing_attention.attention import edit
    from harmonizing_attention.nodes.pipeline import Scene

    source, target = harness.make_image("noise:1", size, size), harness.make_image("checker", size, size)
    mask = torch.zeros(1, size, size)
    mask[:, size // 4: size // 2, size // 4: size // 2] = 1.0
    geometry, geometry_mask = edit.place_source(source, mask, target, edit.Placement(shift_x=size / 8))
    return Scene(source=source, source_mask=mask, target=target, geometry=geometry, geometry_mask=geometry_mask)


def measure(model_name, device, vae, size, steps, iterations, repeats, warmup):
    """(table row, median of (pipeline - VAE encode) / plain UNet) of one model."""
    import comfy.patcher_extension
    import torch
    from harmonizing_attention.nodes import pipeline

    base = common.build_model(model_name, device)
    calls: list[int] = []  # batch size of each UNet evaluation of the pipeline
    inside: list[float] = []  # its time (the patched evaluation)
    twins: list[float] = []  # the plain evaluation of the same batch size, run right after it
    aside = [0.0]  # wall time spent on the twins, taken out of the pipeline's time
    forwards = {}

    def count(executor, x, *rest, **kwargs):
        calls.append(x.shape[0])
        common.sync(device)
        t0 = time.perf_counter()
        out = executor(x, *rest, **kwargs)
        common.sync(device)
        t1 = time.perf_counter()
        inside.append(t1 - t0)
        if x.shape[0] not in forwards:
            forwards[x.shape[0]] = common.Forward(base, x.shape[0], size, device)
        twins.append(common.timed(lambda: forwards[x.shape[0]](base), device))
        aside[0] += time.perf_counter() - t1
        return out

    model = base.clone()
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "ha_bench_count", count)
    context_dim = base.model.model_config.unet_config["context_dim"]
    conditioning = [[torch.randn(1, 77, context_dim, generator=torch.Generator().manual_seed(0)), {}]]
    s = scene(8 * size)
    images = torch.cat([s.source, s.target, s.geometry])
    ratio_total, ratio_net, ratio_unet = [], [], []
    for r in range(1 - warmup, repeats + 1):  # rounds < 1 warm up
        for record in (calls, inside, twins):
            record.clear()
        aside[0] = 0.0
        with torch.inference_mode():  # as ComfyUI's executor runs nodes
            t0 = time.perf_counter()
            inverted = pipeline.invert(model, vae, conditioning, s, steps, iterations, 1, "texture_aligning")
            inverted = pipeline.blend_latents(inverted, 0.0)
            pipeline.generate(model, conditioning, conditioning, inverted, 1.0, "geometry_preserving")
            common.sync(device)
            total = time.perf_counter() - t0 - aside[0]
            t0 = time.perf_counter()
            vae.encode(images)
            vae.encode(images)  # inpainting models: the masked images too
            common.sync(device)
            vae_time = time.perf_counter() - t0 if pipeline.is_inpainting(model) else 0.0
        batches = {b: calls.count(b) for b in sorted(set(calls))}
        unet = sum(twins)
        if r < 1:
            continue
        ratio_total.append(total / unet)
        ratio_net.append((total - vae_time) / unet)
        ratio_unet.append(sum(inside) / unet)
        per_call = common.mmm(common.ratios(inside, twins))
        print(f"  {model_name} round {r}: {total:.2f} s, VAE {vae_time:.2f} s, patched UNet calls "
              f"{sum(inside):.2f} s, plain twins {unet:.2f} s ({batches} evaluations by batch); "
              f"per-call patched/plain {per_call}", flush=True)
    row = [model_name, f"{size}x{size}", f"{steps} x {iterations} + {steps}",
           ", ".join(f"{n} x b{b}" for b, n in batches.items()),
           common.mmm(ratio_total), common.mmm(ratio_net), common.mmm(ratio_unet)]
    return row, statistics.median(ratio_net)


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=None, help="latent size (default 64 for tiny, 32 for sd15; --quick 32)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: tiny 25, sd15 4; --quick 3)")
    p.add_argument("--iterations", type=int, default=None,
                   help="ReNoise iterations (default: tiny 5, sd15 2; --quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (first-call costs)")
    args = p.parse_args(argv)
    device = common.start(args.cpu, args.threads)
    import harness

    repeats = args.repeats or (2 if args.quick else 3)
    print(f"# pipeline overhead on {common.describe(device)}; {repeats} rounds", flush=True)
    vae = harness.tiny_vae()
    rows_out, headline = [], []
    for model_name in common.models_arg(args):
        full = model_name == "sd15"
        size = args.size or (32 if args.quick or full else 64)
        steps = args.steps or (3 if args.quick else 4 if full else 25)
        iterations = args.iterations or (2 if args.quick or full else 5)
        row, net = measure(model_name, device, vae, size, steps, iterations, repeats, args.warmup)
        rows_out.append(row)
        headline.append(net)
    print()
    print(common.table(["model", "latent", "steps x ReNoise + steps", "UNet evaluations",
                        "pipeline / UNet min / med / max", "minus VAE encode min / med / max",
                        "patched UNet calls / plain min / med / max"], rows_out))
    print(f"pipeline_overhead={max(headline):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
