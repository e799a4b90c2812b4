"""torch.compile and the patch: the geometry transfer compiled / eager, and patched / plain with compile on both sides.

- pipeline: pipeline.invert -> blend_latents -> generate (the nodes' functions, through ComfyUI's sampler) on one
  pair (bench/pipeline_overhead.py's scene), on the model as loaded and behind ComfyUI's TorchCompileModel
  (its node's own settings; --backend): the first run (compiling), re-runs (eager and compiled interleaved, the
  ratio per round) and a run with the geometry moved. Wall seconds, compiled / eager, the compilations each run
  caused (torch._dynamo's count of graphs; the pack's copy compiles each patched pass's layout once) and the largest
  difference of the output latents. Re-runs reuse the source passes (nodes/reuse.py) in both columns, as the nodes
  do.
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


def pipeline_runs(models: dict, vae, size: int, steps: int, iterations: int, repeats: int, device) -> dict:
    """Per model (eager, compiled): {run: (seconds, graphs compiled, output latents)} of the first run, the re-runs
    (`repeats` rounds, eager and compiled interleaved: seconds per round) and a run with the geometry moved."""
    import torch
    from harmonizing_attention.attention import edit
    from harmonizing_attention.nodes import pipeline, reuse

    context_dim = next(iter(models.values())).model.model_config.unet_config["context_dim"]
    conditioning = [[torch.randn(1, 77, context_dim, generator=torch.Generator().manual_seed(0)), {}]]
    first = scene(8 * size)
    geometry, mask = edit.place_source(first.source, first.source_mask, first.target,
                                       edit.Placement(shift_x=size * 2.0, shift_y=size * 1.0))
    moved = type(first)(source=first.source, source_mask=first.source_mask, target=first.target, geometry=geometry,
                        geometry_mask=mask)

    def run(model, s):
        before = graphs()
        with torch.inference_mode():
            t0 = time.perf_counter()
            inverted = pipeline.blend_latents(pipeline.invert(model, vae, conditioning, s, steps, iterations, 1,
                                                              "texture_aligning"), 0.0)
            latents, _ = pipeline.generate(model, conditioning, conditioning, inverted, 1.0, "geometry_preserving")
            common.sync(device)
            return time.perf_counter() - t0, graphs() - before, latents.float().cpu()

    reuse.CACHE.clear()  # each model computes its own source passes on its first run, reuses them after
    out = {label: {"first run": run(model, first)} for label, model in models.items()}
    rounds = {label: [] for label in models}
    for r in range(repeats):
        for label in list(models) if r % 2 == 0 else list(models)[::-1]:
            rounds[label].append(run(models[label], first))
    for label, model in models.items():
        out[label]["re-run"] = ([t for t, _, _ in rounds[label]], sum(n for _, n, _ in rounds[label]), rounds[label][-1][2])
        out[label]["geometry moved"] = run(model, moved)
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

    repeats = args.repeats or (9 if args.quick else 15)
    size = args.size or (16 if args.quick else 32)
    steps, iterations = args.steps or (2 if args.quick else 4), args.iterations or (1 if args.quick else 2)
    print(f"# torch.compile ({args.backend}) on {common.describe(device)}; latent {size}x{size}, {steps} steps x "
          f"{iterations} ReNoise + {steps}; {repeats} interleaved rounds (the first run compiles: minutes with inductor "
          "on a CPU, unless inductor's cache has the graphs)", flush=True)
    vae = harness.tiny_vae()
    pipeline_rows, forward_rows, headline = [], [], {}
    for model_name in common.models_arg(args):
        base = common.build_model(model_name, device)
        comp = compiled(base, args.backend)
        runs = pipeline_runs({"eager": base, "compiled": comp}, vae, size, steps, iterations, repeats, device)
        for name in ("first run", "re-run", "geometry moved"):
            (eager, _, a), (comp_s, n, b) = runs["eager"][name], runs["compiled"][name]
            ratio = (common.mmm(common.ratios(comp_s, eager)) if name == "re-run" else f"{comp_s / eager:.3f}")
            seconds = (lambda t: f"{statistics.median(t):.2f}") if name == "re-run" else (lambda t: f"{t:.2f}")
            pipeline_rows.append([model_name, name, seconds(eager), seconds(comp_s), ratio, n,
                                  f"{float((a - b).abs().max()):.2g}"])
        r = forward_ratios(base, comp, size, repeats, device)
        forward_rows.append([model_name, f"{size}x{size}", common.mmm(r["eager"]), common.mmm(r["compiled"]),
                             common.mmm(r["compiled / eager plain"]), common.mmm(r["compiled / eager patched"])])
        headline.setdefault("compile_pipeline_rerun_vs_eager", []).append(
            statistics.median(common.ratios(runs["compiled"]["re-run"][0], runs["eager"]["re-run"][0])))
        headline.setdefault("compile_patched_vs_plain", []).append(statistics.median(r["compiled"]))
        headline.setdefault("eager_patched_vs_plain", []).append(statistics.median(r["eager"]))
        for name, run in (("first_run", "first run"), ("rerun", "re-run"), ("moved", "geometry moved")):
            headline.setdefault(f"compile_graphs_{name}", []).append(runs["compiled"][run][1])
        del base, comp
    print()
    print(common.table(["model", "run", "eager s", "compiled s", "compiled / eager (re-runs: min / med / max)",
                        "graphs compiled", "max |compiled - eager| (latents)"], pipeline_rows))
    print()
    print(common.table(["model", "latent", "patched / plain, eager (min / med / max)", "patched / plain, compiled",
                        "compiled / eager, plain", "compiled / eager, patched"], forward_rows))
    print(" ".join(f"{name}={max(values):.3f}" if isinstance(values[0], float) else f"{name}={max(values)}"
                   for name, values in headline.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
