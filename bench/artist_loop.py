"""The artist's loop through ComfyUI's executor: a first run, then only the placement moved, then only the
colour strength changed; each re-run's time against the first run's, and the UNet evaluations each made.

One PromptExecutor is kept between runs, as the server does, so ComfyUI's own node cache re-executes only
what the change reaches (from HA_GeometryImageEdit or HA_ColorShift on); the pack's reuse cache
(nodes/reuse.py) supplies the sources' inversion. Each round starts with a source image of its own (a first
run: nothing reusable), and the three runs of a round are timed side by side in this process. After the
rounds, the last round's re-runs are run again from an empty reuse cache and a new executor (a fresh
run with the final placement) and compared bit for bit.

The graph is the shipped one's (CLIPTextEncode replaced by a fixed random conditioning of the model's
width): HA_GeometryImageEdit -> HA_ColorShift -> HA_TextureAligningInversion -> HA_LatentBlend ->
HA_GeometryPreservingSampler -> VAEDecode, at steps x 5 ReNoise iterations (the paper's ratio of
inversion to generation work). Models: 'tiny' (tests/harness.py's reduced SD1.5-shaped inpainting UNet, a
tiny VAE), 'sd15' (the full-size SD1.5 inpainting UNet and SD's VAE architecture, random weights) and
'flux-tiny' (tests/harness.py's tiny Flux, a 16-channel tiny VAE: the DiT path, whose re-run replays the sources'
recorded joint-attention tokens as a UNet's replays its self-attention).

    python bench/artist_loop.py [--quick] [--cpu] [--models tiny,sd15,flux-tiny] [--size 32] [--steps N] [--repeats R]
        [--warmup W]
"""
from __future__ import annotations

import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RUNS = ("first", "moved", "colour")


def sd_vae():
    """SD1.x's VAE architecture (AutoencoderKL, 128 channels, 4 levels) with random weights, through comfy.sd.VAE."""
    import comfy.sd
    import torch

    ddconfig = {
        "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
        "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
    }
    import comfy.ldm.models.autoencoder

    shapes = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=4).state_dict()
    gen = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(v.shape, generator=gen) * 0.02 if v.ndim > 1 else
              torch.ones_like(v) if "norm" in k and k.endswith("weight") else torch.zeros_like(v))
          for k, v in shapes.items()}
    return comfy.sd.VAE(sd=sd, config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})


def register_nodes(models: dict, captured: dict) -> None:
    """Bench nodes: HABench_Conditioning (a fixed random conditioning of a width) and HABench_Capture (keeps
    its input in `captured` under a name); tests/harness.py's HATest_TinyCheckpoint / HATest_Image."""
    import harness
    import nodes
    import torch
    from comfy_api.latest import io

    harness.register_test_nodes(models)

    class Conditioning(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="HABench_Conditioning", category="_for_testing",
                             inputs=[io.Int.Input("width", min=1, max=4096)], outputs=[io.Conditioning.Output()])

        @classmethod
        def execute(cls, width):
            gen = torch.Generator().manual_seed(0)  # a pooled output too, for a DiT's vector input (Flux's y)
            return io.NodeOutput([[torch.randn(1, 77, width, generator=gen), {"pooled_output": torch.randn(1, width,
                                                                                                          generator=gen)}]])

    class Capture(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="HABench_Capture", category="_for_testing", is_output_node=True,
                             inputs=[io.Image.Input("image"), io.String.Input("name")], outputs=[])

        @classmethod
        def fingerprint_inputs(cls, **kwargs):
            return float("nan")  # run every time: it records which run produced the image

        @classmethod
        def execute(cls, image, name):
            captured[name] = image.clone()
            return io.NodeOutput()

    for cls in (Conditioning, Capture):
        nodes.NODE_CLASS_MAPPINGS[cls.GET_SCHEMA().node_id] = cls


def prompt(ckpt: str, width: int, pixels: int, source: str, steps: int, iterations: int, shift: float,
           strength: float, name: str) -> dict:
    box = pixels // 4, pixels // 2  # the mask: a square, a quarter of the image's width
    return {
        "1": {"class_type": "HATest_TinyCheckpoint", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "HABench_Conditioning", "inputs": {"width": width}},
        "3": {"class_type": "HATest_Image", "inputs": {"name": source, "width": pixels, "height": pixels}},
        "4": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": pixels, "height": pixels}},
        "5": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": box[1] - box[0], "height": box[1] - box[0]}},
        "6": {"class_type": "MaskComposite", "inputs": {"destination": ["4", 0], "source": ["5", 0], "x": box[0],
                                                        "y": box[0], "operation": "add"}},
        "7": {"class_type": "HATest_Image", "inputs": {"name": "checker", "width": pixels, "height": pixels}},
        "8": {"class_type": "HA_GeometryImageEdit", "inputs": {
            "source": ["3", 0], "source_mask": ["6", 0], "target": ["7", 0],
            "shift_x": shift, "shift_y": 0.0, "scale": 1.0, "rotation": 0.0}},
        "9": {"class_type": "HA_ColorShift", "inputs": {"scene": ["8", 2], "mode": "mean_shift", "strength": strength,
                                                        "ring_width": 8}},
        "10": {"class_type": "HA_TextureAligningInversion", "inputs": {
            "model": ["1", 0], "vae": ["1", 2], "conditioning": ["2", 0], "scene": ["9", 1], "steps": steps,
            "renoise_iterations": iterations, "renoise_average": 1, "attention": "texture_aligning"}},
        "11": {"class_type": "HA_LatentBlend", "inputs": {"inverted": ["10", 0], "feather": 0.0}},
        "12": {"class_type": "HA_GeometryPreservingSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0], "inverted": ["11", 0], "cfg": 1.0,
            "attention": "geometry_preserving"}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["1", 2]}},
        "14": {"class_type": "HABench_Capture", "inputs": {"image": ["13", 0], "name": name}},
    }


class Runner:
    """Validates and executes prompts on one PromptExecutor (kept between runs, as the server does)."""

    def __init__(self):
        import comfy_runtime

        self.executor = comfy_runtime.new_executor()  # this ComfyUI's PromptExecutor with the classic node cache

    def __call__(self, graph: dict, device) -> tuple[float, float]:
        """(wall seconds, this process's CPU seconds) of one execution."""
        import asyncio

        import execution

        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(execution.validate_prompt(prompt_id, graph, None))
        if not valid[0]:
            raise RuntimeError(f"prompt invalid: {valid[1]} {valid[3]}")
        common.sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        self.executor.execute(graph, prompt_id, {}, valid[2])
        common.sync(device)
        if not self.executor.success:
            raise RuntimeError(f"execution failed: {self.executor.status_messages[-1:]}")
        return time.perf_counter() - wall, time.process_time() - cpu


def loaded_reuse():
    """nodes/reuse.py as ComfyUI loaded the pack (the module whose cache the nodes use)."""
    import nodes

    module = nodes.NODE_CLASS_MAPPINGS["HA_TextureAligningInversion"].__module__
    return sys.modules[module.rsplit(".", 1)[0] + ".reuse"]


def measure(model_name, device, size, steps, iterations, repeats, warmup):
    import comfy.model_management
    import harness

    reuse = loaded_reuse()

    base = common.build_model(model_name, device)
    rows: list[int] = []

    def count(executor, x, *args, **kwargs):
        rows.append(x.shape[0])
        return executor(x, *args, **kwargs)

    model = harness.with_diffusion_wrapper(base, "ha_bench_count", count)
    vae = sd_vae() if model_name == "sd15" else harness.tiny_vae(seed=7, z_channels=16) if model_name == "flux-tiny" \
        else harness.tiny_vae()
    captured: dict = {}
    ckpt = f"bench-{model_name}"
    register_nodes({ckpt: (model, None, vae)}, captured)
    config = base.model.model_config.unet_config
    width = config.get("context_dim") or config["context_in_dim"]
    settings = {"first": (8.0, 0.5), "moved": (16.0, 0.5), "colour": (16.0, 0.8)}
    runner = Runner()
    times = {run: [] for run in RUNS}
    cpu = {run: [] for run in RUNS}
    evaluations = {}
    graphs = {}
    for r in range(1 - warmup, repeats + 1):  # rounds < 1 warm up (first-call costs), untimed
        for run in RUNS:
            shift, strength = settings[run]
            graphs[run] = prompt(ckpt, width, 8 * size, f"noise:{100 + r}", steps, iterations, shift, strength, run)
            rows.clear()
            wall, proc = runner(graphs[run], device)
            evaluations[run] = f"{len(rows)} ({sum(rows)} rows)"
            if r > 0:
                times[run].append(wall)
                cpu[run].append(proc)
        if r > 0:
            print(f"  {model_name} round {r}: " + ", ".join(
                f"{run} {times[run][-1]:.2f} s (cpu {cpu[run][-1]:.2f} s)" for run in RUNS), flush=True)
    identical = []
    for run in ("moved", "colour"):  # fresh: empty reuse cache, new executor
        reuse.CACHE.clear()
        result = captured[run]
        Runner()(graphs[run], device)
        identical.append(bool(result.shape == captured[run].shape and (result == captured[run]).all()))
    per_source = reuse.CACHE.bytes  # the entries of the last fresh run (begun on an empty cache): one source's
    comfy.model_management.unload_all_models()
    reuse.release_unloaded()
    ratio = {run: common.ratios(times[run], times["first"]) for run in RUNS[1:]}
    cpu_ratio = {run: common.ratios(cpu[run], cpu["first"]) for run in RUNS[1:]}
    row = [model_name, f"{size}x{size}", f"{steps} x {iterations} + {steps}",
           f"{statistics.median(times['first']):.2f}",
           *(f"{common.mmm(ratio[run])} (cpu {statistics.median(cpu_ratio[run]):.3f})" for run in RUNS[1:]),
           " / ".join(evaluations[run] for run in RUNS), "yes" if all(identical) else "NO",
           f"{per_source / 2 ** 10:.0f}"]
    worst = {"wall": max(statistics.median(ratio[run]) for run in RUNS[1:]),
             "cpu": max(statistics.median(cpu_ratio[run]) for run in RUNS[1:]),
             "moved": statistics.median(ratio["moved"])}
    return row, worst, all(identical)


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=32, help="latent size (default 32: 256 px images)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: tiny 25, sd15 4; --quick 5)")
    p.add_argument("--iterations", type=int, default=5, help="ReNoise iterations (default 5, the paper's)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (first-call costs)")
    args = p.parse_args(argv)
    device = common.start(args.cpu, args.threads)
    repeats = args.repeats or (1 if args.quick else 3)
    print(f"# artist loop on {common.describe(device)}; {repeats} rounds (+{args.warmup} warm-up)", flush=True)
    rows_out, worst, moved, all_identical = [], {"wall": 0.0, "cpu": 0.0}, {}, True
    for model_name in common.models_arg(args):
        cpu_full = model_name == "sd15" and device.type != "cuda"
        steps = args.steps or (5 if args.quick else 4 if cpu_full else 25)
        row, ratio, identical = measure(model_name, device, args.size, steps, args.iterations, repeats, args.warmup)
        rows_out.append(row)
        worst = {clock: max(worst[clock], ratio[clock]) for clock in worst}
        moved[model_name.replace("-", "_")] = ratio["moved"]
        all_identical = all_identical and identical
    print()
    print(common.table(["model", "latent", "steps x ReNoise + steps", "first run s (median)",
                        "moved / first min / med / max", "colour / first min / med / max",
                        "model evaluations: first / moved / colour", "re-runs == fresh runs (bit)",
                        "reuse cache KiB per source"], rows_out))
    print("\nre-run / first run: median over rounds, worst of moved and colour; wall time, and this process's CPU "
          "time (on a CPU with --threads 1 the CPU time does not count time other processes hold the core)")
    print(f"artist_loop_rerun_over_first_worst={worst['wall']:.3f} cpu_time={worst['cpu']:.3f} "
          + "".join(f"moved_over_first_{name}={r:.3f} " for name, r in moved.items()) + f"bit_identical={all_identical}")
    return 0 if all_identical else 1


if __name__ == "__main__":
    sys.exit(main())
