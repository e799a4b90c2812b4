"""A small random-weight SD1.5 checkpoint for checking an install (scripts/run.sh --check) and for the tests.

    python scripts/tiny_checkpoint.py              # prints the path of the cached inpainting one (built once)
    python scripts/tiny_checkpoint.py --plain OUT.safetensors

CheckpointLoaderSimple detects the file as SD1.5 (inpainting: 9 input channels), so the shipped workflows run on it
as they are: a reduced UNet at SD1.5's detection widths (model_channels 320, context_dim 768), the full-size CLIP-L
text encoder (CheckpointLoaderSimple always builds it at full size: ~250 MB of the file) and a TAESD autoencoder as the
VAE (ComfyUI detects it by its keys). Its weights are random: every image it makes is noise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_runtime  # noqa: E402

PACK_NAME = "comfyui-harmonizing-attention"
CHECKPOINT_VERSION = 2  # bump when the checkpoint layout changes: cached files are keyed by it
# one level: SD1.5 detection fixes the width (320) and text width (768), not the depth
TINY_UNET = {"model_channels": 320, "context_dim": 768, "channel_mult": [1], "num_res_blocks": [1],
             "transformer_depth": [1], "transformer_depth_output": [1, 1],
             "transformer_depth_middle": 1, "num_heads": 8}


def cache_dir() -> Path:
    """Where the built checkpoint is kept: $HA_CACHE_DIR, else the user's cache folder."""
    if os.environ.get("HA_CACHE_DIR"):
        return Path(os.environ["HA_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / PACK_NAME


def _random_state(module, prefix: str, gen, dtype) -> dict:
    """Seeded random weights for every tensor of `module` (scaled like a trained net's)."""
    import torch

    out = {}
    for name, t in module.state_dict().items():
        if name.endswith("bias"):
            v = torch.randn(t.shape, generator=gen) * 0.02
        elif ("norm" in name or "ln" in name.split(".")[-2:][0]) and t.ndim == 1:
            v = 1 + torch.randn(t.shape, generator=gen) * 0.02
        elif t.ndim == 0 or not t.dtype.is_floating_point:
            v = t.clone()
        else:
            fan_in = max(1, t[0].numel()) if t.ndim > 1 else t.numel()
            v = torch.randn(t.shape, generator=gen) / fan_in ** 0.5
        out[prefix + name] = v.to(dtype if v.dtype.is_floating_point else v.dtype).contiguous()
    return out


def write_checkpoint(path: Path, in_channels: int = 9, seed: int = 0) -> Path:
    """Write the tiny SD1.5(-inpainting) checkpoint to `path` (fp16 safetensors). Sets ComfyUI up for this machine's
    device first unless it is already (comfy.model_management picks the device when first imported)."""
    import torch

    if "comfy.model_management" not in sys.modules:
        comfy_runtime.configure(cpu=not torch.cuda.is_available())
    import comfy.clip_model
    import comfy.ops
    import comfy.supported_models
    import comfy.taesd.taesd
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    config = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
              "adm_in_channels": None, "in_channels": in_channels, "out_channels": 4, "num_head_channels": -1,
              "use_linear_in_transformer": False, "use_temporal_resblock": False,
              "use_temporal_attention": False, **TINY_UNET}
    unet = comfy.supported_models.SD15(config).get_model({}).diffusion_model
    sd = _random_state(unet, "model.diffusion_model.", gen, torch.float16)
    del unet
    clip_config = json.loads((Path(comfy.clip_model.__file__).parent / "sd1_clip_config.json").read_text())
    clip = comfy.clip_model.CLIPTextModel(clip_config, torch.float32, "cpu", comfy.ops.disable_weight_init)
    sd.update(_random_state(clip, "cond_stage_model.transformer.", gen, torch.float16))
    del clip
    vae = comfy.taesd.taesd.TAESD(latent_channels=4)
    sd.update(_random_state(vae, "first_stage_model.", gen, torch.float16))
    # TAESD's last conv gives the pixels: mid-grey plus visible detail, not random weights' near-black
    last = "first_stage_model.taesd_decoder.19."
    sd[last + "bias"] = torch.full_like(sd[last + "bias"], 0.5)
    sd[last + "weight"] = sd[last + "weight"] * 8
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    save_file(sd, str(tmp))
    tmp.replace(path)
    return path


def tiny_checkpoint(in_channels: int = 9) -> Path:
    """The cached tiny checkpoint (written once per machine, ~5 s, ~300 MB: the CLIP-L text encoder)."""
    path = cache_dir() / f"tiny-sd15-{'inpaint' if in_channels == 9 else 'plain'}-v{CHECKPOINT_VERSION}.safetensors"
    if not path.is_file():
        write_checkpoint(path, in_channels)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", type=Path, help=f"where to write it (default: cached in {cache_dir()})")
    p.add_argument("--plain", action="store_true", help="a plain SD1.5 (4 input channels) instead of inpainting")
    args = p.parse_args(argv)
    channels = 4 if args.plain else 9
    print(write_checkpoint(args.out, channels) if args.out else tiny_checkpoint(channels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
