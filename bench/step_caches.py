"""What ComfyUI's step caches (EasyCache, LazyCache) do to a geometry transfer, and what the pack does with them.

For each model and cache setting, on one (source, target) pair through the functions the nodes call:
- pack: the run with the cache on the MODEL (the pack suspends it, patch.without_step_caches) against the cache-free
  run, bit for bit (inverted latents and outputs);
- inversion with the cache (the counterfactual, suspension switched off in this process only): the error it raises, or
  the source reconstruction error |generated source - encoded source| (mean, latent space) after a cache-free generation;
- generation with the cache (cache-free inversion): the model evaluations it ran / the cache-free pass's, the output's
  change relative to the cache-free output (||out - out_ref|| / ||out_ref||) next to the change Geometry-preserving
  Attention itself makes (||out_ref - out_self_only|| / ||out_ref||), or the error it raises (a UNet's output pass
  replays the source pass evaluation by evaluation);
- the generation's share of the run's model work (rows x evaluations): the most a cache on that pass could save.

Random-weight models: their outputs change erratically from step to step, so the caches' skip decisions and errors say
nothing about trained models; the shares and the pack's bit-identity hold for any weights.

    python bench/step_caches.py [--quick] [--cpu] [--models tiny,flux-tiny] [--steps 25] [--iterations 5]
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from pipeline_overhead import scene  # noqa: E402

SETTINGS = {  # reuse_threshold, start_percent, end_percent
    "default": (0.2, 0.15, 0.95),  # ComfyUI's (both versions)
    "moderate": (0.5, 0.15, 0.95),
    "aggressive": (1.0, 0.0, 1.0),
}


@contextmanager
def suspension_off():
    """The counterfactual: the pack's passes run the MODEL's step caches."""
    from harmonizing_attention.nodes import pipeline

    suspend = pipeline.without_step_caches
    pipeline.without_step_caches = lambda model: model
    try:
        yield
    finally:
        pipeline.without_step_caches = suspend


def counted(model, evaluations: list):
    """A clone whose diffusion-model runs are appended to `evaluations` (batch rows): innermost of the ModelPatcher's
    wrappers, so an evaluation a cache skips is not counted."""
    import comfy.patcher_extension

    def count(executor, x, *args, **kwargs):
        evaluations.append(x.shape[0])
        return executor(x, *args, **kwargs)

    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "bench-count", count)
    return clone


def attempt(fn):
    try:
        return fn(), None
    except Exception as err:  # the counterfactual may crash: that is one of its outcomes
        return None, f"{type(err).__name__}: {str(err).split(' (')[0][:70]}"


def measure(model_name, device, steps, iterations, size):
    import torch

    with torch.no_grad():
        return _measure(model_name, device, steps, iterations, size)


def _measure(model_name, device, steps, iterations, size):
    import harness
    import torch
    from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode
    from harmonizing_attention.nodes import pipeline

    base = common.build_model(model_name, device)
    dit = pipeline.is_dit(base)
    clip = harness.tiny_clip()
    vae = harness.tiny_vae(seed=7, z_channels=16) if dit else harness.tiny_vae()
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    s = scene(size)
    z_src = vae.encode(s.source)

    def invert(model):
        return pipeline.blend_latents(pipeline.invert(model, vae, cond, s, steps, iterations, 1, "texture_aligning"), 0.0)

    def generate(model, inverted, mode="geometry_preserving"):
        return pipeline.generate(model, cond, cond, inverted, 1.0, mode)

    work: list[int] = []
    ref_inv = invert(counted(base, work))
    inversion_work = sum(work)
    work.clear()
    ref_out, ref_src = generate(counted(base, work), ref_inv)
    generation_work, generation_evals = sum(work), len(work)
    self_only, _ = generate(base, ref_inv, "self_only")
    effect = float((ref_out - self_only).norm() / ref_out.norm())
    ref_err = float((ref_src - z_src).abs().mean())
    share = generation_work / (generation_work + inversion_work)
    rows, identical = [], True
    for node in (EasyCacheNode, LazyCacheNode):
        for label, (threshold, start, end) in SETTINGS.items():
            cached = node.execute(base, threshold, start, end, False).result[0]
            inv = invert(cached)
            out, src = generate(cached, inv)
            same = torch.equal(inv.latents, ref_inv.latents) and torch.equal(out, ref_out) and torch.equal(src, ref_src)
            identical &= same
            with suspension_off():
                bad_inv, inv_error = attempt(lambda cached=cached: invert(cached))
                if bad_inv is not None:
                    _, bad_src = generate(base, bad_inv)
                    inv_error = f"source error {ref_err:.3f} -> {float((bad_src - z_src).abs().mean()):.3f}"
                work.clear()
                gen, gen_error = attempt(lambda cached=cached: generate(counted(cached, work), ref_inv))
            if gen is not None:
                change = float((gen[0] - ref_out).norm() / ref_out.norm())
                gen_error = f"{len(work)}/{generation_evals} evaluations, output change {change:.3f} (GP: {effect:.3f})"
            name = node.__name__.removesuffix("Node")
            rows.append([model_name, f"{name} {label} ({threshold}, {start}-{end})", "yes" if same else "NO",
                         inv_error, gen_error])
            print(f"  {rows[-1]}", flush=True)
    return rows, share, identical


def main() -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 25; --quick 10)")
    p.add_argument("--iterations", type=int, default=None, help="ReNoise iterations (default 5; --quick 2)")
    p.add_argument("--size", type=int, default=64, help="image size in pixels (default 64)")
    args = p.parse_args()
    device = common.start(args.cpu, args.threads)
    from harmonizing_attention.nodes import reuse

    reuse.CACHE.budget = 0  # every run computes: the counterfactual runs share MODEL objects with the pack's
    steps = args.steps or (10 if args.quick else 25)
    iterations = args.iterations or (2 if args.quick else 5)
    models = [m.strip() for m in args.models.split(",")] if args.models else (
        ["tiny"] if args.quick else ["tiny", "flux-tiny"])
    print(f"# step caches on {common.describe(device)}; {args.size} px, {steps} steps x {iterations} ReNoise + "
          f"{steps} steps, cfg 1", flush=True)
    rows, shares, identical = [], [], True
    for model_name in models:
        model_rows, share, same = measure(model_name, device, steps, iterations, args.size)
        rows += model_rows
        shares.append(share)
        identical &= same
        print(f"  {model_name}: the generation is {share:.3f} of the run's model work (rows x evaluations)", flush=True)
    print()
    print(common.table(["model", "cache (threshold, window)", "pack == cache-free (bit)",
                        "inversion with the cache", "generation with the cache"], rows))
    print(f"step_caches_suspended_bit_identical={identical} generation_share_max={max(shares):.3f}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
