"""torch.compile and the patch: the geometry transfer compiled / eager, and patched / plain with compile on both sides.

- pipeline: pipeline.invert -> blend_latents -> generate (the nodes' functions, through ComfyUI's sampler) on one
  pair (bench/pipeline_overhead.py's scene), on the model as loaded and behind ComfyUI's TorchCompileModel
  (its node's own settings; --backend): the first run (compiling), a re-run, and a re-run with the geometry moved.
  Wall seconds per run, compiled / eager per run, and the compilations each run caused (torch._dynamo's count of
  graphs; the pack's copy compiles each patched pass's layout once). Re-runs reuse the source passes (nodes/reuse.py)
  in both columns, as the nodes do.
- forward: one patched evaluation (geometry-preserving rule on the generation batch [src, out]) / one plain
  evaluation of the same batch, both eager and both compiled (the plain model through TorchCompileModel's own
  compiled copy, the patched one through the pack's), interleaved rounds.

    python bench/compile.py [--quick] [--cpu] [--models tiny,sd15] [--size 16] [--backend inductor]
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from attention_overhead import plan_for  # noqa: E402
from pipeline_overhead import scene  # noqa: E402


def compiled(model, backend: str):
    """`model` behind ComfyUI's TorchCompileModel node (both versions' own settings)."""
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    out = TorchCompileModel.execute(model, backend)
    return out.result[0] if hasattr(out, "result") else out[0]


def sampled(patcher):
    """A clone whose transformer_options carry the patcher's wrappers (the compile wrapper among them), as
    comfy.sampler_helpers.prepare_model_patcher puts them for a sampler: for direct apply_model calls."""
    import comfy.patcher_extension

    clone = patcher.clone()
    comfy.patcher_extension.merge_nested_dicts(clone.model_options["transformer_options"].setdefault("wrappers", {}),
                                               patcher.wrappers, copy_dict1=False)
    return clone


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def pipeline_runs(model, vae, size: int, steps: int, iterations: int, device) -> list[tuple[str, float, int]]:
    """(run, seconds, graphs compiled) of the first run, a re-run and a re-run with the geometry moved."""
    import torch
    from harmonizing_attention.attention import edit
    from harmonizing_attention.nodes import pipeline

    context_dim = model.model.model_config.unet_config["context_dim"]
    conditioning = [[torch.randn(1, 77, context_dim, generator=torch.Generator().manual_seed(0)), {}]]
    first = scene(8 * size)
    geometry, mask = edit.place_source(first.source, first.source_mask, first.target,
                                       edit.Placement(shift_x=size * 2.0, shift_y=size * 1.0))
    moved = type(first)(source=first.source, source_mask=first.source_mask, target=first.target, geometry=geometry,
                        geometry_mask=mask)
    out = []
    for name, s in (("first run", first), ("re-run", first), ("geometry moved", moved)):
        before = graphs()
        with torch.inference_mode():
            t0 = time.perf_counter()
            inverted = pipeline.blend_latents(pipeline.invert(model, vae, conditioning, s, steps, iterations, 1,
                                                              "texture_aligning"), 0.0)
            pipeline.generate(model, conditioning, conditioning, inverted, 1.0, "geometry_preserving")
            common.sync(device)
            out.append((name, time.perf_counter() - t0, graphs() - before))
        print(f"    {name}: {out[-1][1]:.2f} s, {out[-1][2]} graph(s) compiled", flush=True)
    return out


def forward_ratios(base, comp, size: int, repeats: int, device) -> dict[str, list[float]]:
    """Per-round patched / plain evaluation times, eager and compiled."""
    from harmonizing_attention.nodes.patch import apply_plan

    plan = plan_for("geometry_preserving", size)
    forward = common.Forward(base, plan.rows, size, device)
    variants = {"eager plain": lambda: forward(base), "eager patched": lambda m=apply_plan(base, plan): forward(m),
                "compiled plain": lambda m=sampled(comp): forward(m),
                "compiled patched": lambda m=sampled(apply_plan(comp, plan)): forward(m)}
    times = common.interleaved(variants, repeats, device, warmup=2)  # the first calls compile
    return {"eager": common.ratios(times["eager patched"], times["eager plain"]),
            "compiled": common.ratios(times["compiled patched"], times["compiled plain"]),
            "compiled / eager plain": common.ratios(times["compiled plain"], times["eager plain"]),
            "compiled / eager patched": common.ratios(times["compiled patched"], times["eager patched"])}


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=None, help="latent size (default: tiny 32, sd15 32; --quick 16)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 4; --quick 2)")
    p.add_argument("--iterations", type=int, default=None, help="ReNoise iterations (default 2; --quick 1)")
    p.add_argument("--backend", default="inductor", help="TorchCompileModel's backend (inductor, cudagraphs)")
    args = p.parse_args(argv)
    device = common.start(args.cpu, args.threads)
    import harness
    from harmonizing_attention.nodes import reuse

    repeats = args.repeats or (3 if args.quick else 7)
    size = args.size or (16 if args.quick else 32)
    steps, iterations = args.steps or (2 if args.quick else 4), args.iterations or (1 if args.quick else 2)
    print(f"# torch.compile ({args.backend}) on {common.describe(device)}; latent {size}x{size}, {steps} steps x "
          f"{iterations} ReNoise + {steps}; {repeats} interleaved forward rounds", flush=True)
    vae = harness.tiny_vae()
    pipeline_rows, forward_rows, headline = [], [], {}
    for model_name in common.models_arg(args):
        base = common.build_model(model_name, device)
        comp = compiled(base, args.backend)
        runs = {}
        for label, model in (("eager", base), ("compiled", comp)):
            print(f"  {model_name} {label}:", flush=True)
            reuse.CACHE.clear()  # each column computes its own source passes on its first run
            runs[label] = pipeline_runs(model, vae, size, steps, iterations, device)
        for (name, eager, _), (_, comp_s, n) in zip(runs["eager"], runs["compiled"], strict=True):
            pipeline_rows.append([model_name, name, f"{eager:.2f}", f"{comp_s:.2f}", f"{comp_s / eager:.3f}", n])
        r = forward_ratios(base, comp, size, repeats, device)
        forward_rows.append([model_name, f"{size}x{size}", common.mmm(r["eager"]), common.mmm(r["compiled"]),
                             common.mmm(r["compiled / eager plain"]), common.mmm(r["compiled / eager patched"])])
        headline.setdefault("compile_pipeline_rerun_vs_eager", []).append(runs["compiled"][1][1] / runs["eager"][1][1])
        headline.setdefault("compile_patched_vs_plain", []).append(statistics.median(r["compiled"]))
        headline.setdefault("eager_patched_vs_plain", []).append(statistics.median(r["eager"]))
        headline.setdefault("compile_graphs_first_run", []).append(runs["compiled"][0][2])
        headline.setdefault("compile_graphs_rerun", []).append(runs["compiled"][1][2])
        headline.setdefault("compile_graphs_moved", []).append(runs["compiled"][2][2])
        del base, comp
    print()
    print(common.table(["model", "run", "eager s", "compiled s", "compiled / eager", "graphs compiled"], pipeline_rows))
    print()
    print(common.table(["model", "latent", "patched / plain, eager (min / med / max)", "patched / plain, compiled",
                        "compiled / eager, plain", "compiled / eager, patched"], forward_rows))
    print(" ".join(f"{name}={max(values):.3f}" if isinstance(values[0], float) else f"{name}={max(values)}"
                   for name, values in headline.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
