"""Shared set-up of the benchmarks: start ComfyUI, build random-weight models, time forwards.

The benches import the pack as the package `harmonizing_attention` (as the tests do) and build
their models with tests/harness.py's builders. ComfyUI picks the device (comfy.model_management):
a GPU when there is one, the CPU with --cpu or when there is none.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]

# the real SD1.5 UNet (comfy/model_detection.py's SD15 config), as the inpainting variant (9 input channels)
SD15_UNET = {
    "model_channels": 320, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "transformer_depth_middle": 1, "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
}


# Flux.1 and SD3.5 Medium at full width (tokens, heads, head size, text length as in the real models), depth
# reduced to a few blocks of each kind: the patched / plain ratio and the memory growth are per block
FLUX_WIDTH = {
    "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096, "hidden_size": 3072,
    "mlp_ratio": 4.0, "num_heads": 24, "depth": 2, "depth_single_blocks": 4, "axes_dim": [16, 56, 56], "theta": 10000,
    "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
}
SD35M_WIDTH = {
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 24, "num_blocks": 4, "input_size": None,
    "adm_in_channels": 2048, "pos_embed_scaling_factor": None, "num_patches": 384 * 384, "pos_embed_max_size": 384,
    "qk_norm": "rms", "x_block_self_attn_layers": [],
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}},
}


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats (under a minute on a CPU)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.add_argument("--models", default=None, help="comma-separated: tiny, sd15, flux-tiny, flux, sd35m "
                                                   "(default: tiny, sd15; --quick: tiny)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared machine, OpenMP teams of several threads "
                        "stall when a core is taken away, which makes timings erratic; 0 = torch's default)")
    return p


def add_clock(p: argparse.ArgumentParser) -> None:
    """--clock, for the benches that time with timed()."""
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time; cpu: this thread's CPU time (CPU runs with --threads 1 only: unlike "
                        "wall time it does not count the time other processes hold the core)")


CLOCK = {"wall": time.perf_counter, "cpu": time.thread_time}
clock = CLOCK["wall"]


def start(cpu: bool, threads: int = 0, clock_name: str = "wall"):
    """ComfyUI in-process with the pack loaded (PyTorch attention); returns the torch device. `clock_name`:
    what timed() measures (see --clock)."""
    sys.path.insert(0, str(PACK_ROOT / "scripts"))
    sys.path.insert(0, str(PACK_ROOT / "tests"))
    import comfy_runtime
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    comfy_runtime.start(cpu=cpu or not torch.cuda.is_available())
    global clock
    on_gpu = torch.cuda.is_available() and not cpu
    if clock_name == "cpu" and (on_gpu or torch.get_num_threads() != 1):
        raise SystemExit("--clock cpu measures one thread's CPU time: use it with --cpu --threads 1")
    clock = CLOCK[clock_name]
    comfy_runtime.as_package()
    import comfy.model_management

    return comfy.model_management.get_torch_device()


def build_model(name: str, device, seed: int = 0):
    """'tiny' (tests/harness.py's SD1.5-shaped reduced UNet, attention at both levels) or 'sd15' (the
    full-size SD1.5 inpainting UNet, 860 M random weights); both with 9 input channels (inpainting).
    fp16 on a GPU, fp32 on the CPU."""
    import harness
    import torch

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if name in ("flux-tiny", "flux", "sd35m"):
        return build_dit(name, dtype, seed)
    overrides = {"dtype": dtype}
    if name == "sd15":
        overrides.update(SD15_UNET)
    elif name != "tiny":
        raise ValueError(f"model {name!r}: choose tiny or sd15")
    return harness.tiny_model(in_channels=9, seed=seed, **overrides)


def build_dit(name: str, dtype, seed: int = 0):
    """'flux-tiny' (tests/harness.py's), 'flux' (FLUX_WIDTH) or 'sd35m' (SD35M_WIDTH), random weights, through
    ComfyUI's supported_models classes."""
    import comfy.supported_models
    import harness
    import torch

    if name == "flux-tiny":
        return harness.tiny_flux(seed=seed, guidance_embed=True, depth=2, single=2)
    if name == "flux":
        import dataclasses

        import comfy.ldm.flux.model

        config = {"image_model": "flux", **FLUX_WIDTH}
        fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
        if "txt_ids_dims" in fields:
            config["txt_ids_dims"] = []
        model_config = comfy.supported_models.Flux(config)
    else:
        model_config = comfy.supported_models.SD3(dict(SD35M_WIDTH))
    model_config.set_inference_dtype(dtype, None)
    patcher = harness._patcher(model_config, {}, seed)
    pos = getattr(patcher.model.diffusion_model, "pos_embed", None)
    if pos is not None:
        with torch.no_grad():
            pos.normal_(0, 0.1)
    return patcher


def models_arg(args) -> list[str]:
    if args.models:
        return [m.strip() for m in args.models.split(",") if m.strip()]
    return ["tiny"] if args.quick else ["tiny", "sd15"]


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Forward:
    """One UNet evaluation of a fixed batch through BaseModel.apply_model (the call ComfyUI's sampler
    makes), with a patcher's transformer_options; inputs are seeded random tensors."""

    def __init__(self, patcher, rows: int, size: int, device, sigma: float = 5.0, seed: int = 0):
        import comfy.model_management
        import torch

        comfy.model_management.load_models_gpu([patcher])
        model = patcher.model
        gen = torch.Generator().manual_seed(seed)
        self.device = device
        self.model = model
        config = model.model_config.unet_config
        latent = model.latent_format.latent_channels
        self.extra = {}
        if "context_dim" in config:  # a UNet
            context = (77, config["context_dim"])
        else:  # Flux or SD3: text tokens of the real model, pooled vector, Flux's guidance
            sigma = min(sigma, 0.9)
            text = 77 if config.get("hidden_size") == 64 else (512 if "vec_in_dim" in config else 333)
            context = (text, config.get("context_in_dim") or config["context_embedder_config"]["params"]["in_features"])
            pooled = config.get("vec_in_dim") or config["adm_in_channels"]
            self.extra["y"] = torch.randn(rows, pooled, generator=gen).to(device)
            if config.get("guidance_embed"):
                self.extra["guidance"] = torch.full((rows,), 3.5, device=device)
        in_channels = config["in_channels"]
        self.x = torch.randn(rows, latent, size, size, generator=gen).to(device)
        self.sigma = torch.full((rows,), sigma, device=device)
        self.context = torch.randn(rows, *context, generator=gen).to(device)
        self.concat = None  # inpainting models: [mask, masked image] latents
        if in_channels > latent:
            self.concat = torch.randn(rows, in_channels - latent, size, size, generator=gen).to(device)

    def __call__(self, patcher):
        import torch

        options = dict(patcher.model_options["transformer_options"])
        options.update(cond_or_uncond=[0], sigmas=self.sigma)
        with torch.inference_mode():
            return self.model.apply_model(self.x, self.sigma, c_concat=self.concat, c_crossattn=self.context,
                                          transformer_options=options, **self.extra)


def timed(fn, device) -> float:
    sync(device)
    t0 = clock()
    fn()
    sync(device)
    return clock() - t0


def interleaved(variants: dict, repeats: int, device, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each variant, calls interleaved (ABAB.., order reversed every other round) so
    that load drifts on a shared machine hit all variants alike."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(timed(variants[name], device))
    return times


def ratios(num: list[float], den: list[float]) -> list[float]:
    """Per-round ratios of side-by-side measurements (round r of num over round r of den)."""
    return [a / b for a, b in zip(num, den, strict=True)]


def mmm(values: list[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def describe(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
