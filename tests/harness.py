"""Drives the real ComfyUI runtime in-process on the CPU, with tiny random-weight models.

`start()` finds ComfyUI, initialises it for the CPU with PyTorch attention, points every folder
ComfyUI writes to at a temporary directory, and loads this pack through ComfyUI's own loader.
The model builders use ComfyUI's own classes; `run_prompt` validates and executes an API-format
prompt through `execution.PromptExecutor` and returns each node's outputs.
"""
from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PACK_ROOT / "scripts"))  # comfy_runtime, run_workflow, workflow_format

from comfy_runtime import PromptError, run_prompt  # noqa: E402,F401  (re-exported for the tests)
import comfy_runtime  # noqa: E402

_state: dict = {}


def start() -> dict:
    """Initialise ComfyUI once per process, every folder it writes to in a temporary directory."""
    if _state:
        return _state
    logging.getLogger().setLevel(logging.WARNING)
    root = comfy_runtime.start(cpu=True)
    import folder_paths

    tmp = Path(tempfile.mkdtemp(prefix="ha-comfy-"))
    for name, setter in (
        ("output", folder_paths.set_output_directory),
        ("temp", folder_paths.set_temp_directory),
        ("input", folder_paths.set_input_directory),
        ("user", folder_paths.set_user_directory),
    ):
        (tmp / name).mkdir()
        setter(str(tmp / name))
    (tmp / "checkpoints").mkdir()
    folder_paths.add_model_folder_path("checkpoints", str(tmp / "checkpoints"), is_default=True)
    _state.update(root=root, tmp=tmp)
    return _state


def loaded(name: str):
    """The pack's module `name` (e.g. "reuse") as ComfyUI loaded the pack: graphs run there, while
    `harmonizing_attention` is the tests' own copy."""
    import nodes

    module = nodes.NODE_CLASS_MAPPINGS["HA_TextureAligningInversion"].__module__
    return sys.modules[f"{module.rsplit('.', 1)[0]}.{name}"]


# ---------------------------------------------------------------- tiny random-weight models

def _init_(module, seed: int):
    """ComfyUI leaves weights uninitialised (torch.empty): give every parameter a seeded value."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif "norm" in name and p.ndim == 1:
                p.copy_(1 + torch.randn(p.shape, generator=gen) * 0.02)
            else:
                fan_in = max(1, p[0].numel()) if p.ndim > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
    return module


TINY_CONTEXT_DIM = 32


def tiny_unet_config(in_channels: int = 4, **overrides) -> dict:
    """An SD1.5-shaped UNet, reduced: two levels, attention at both, one transformer block each."""
    config = {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": in_channels, "out_channels": 4, "model_channels": 32,
        "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
        "channel_mult": [1, 2], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
        "context_dim": TINY_CONTEXT_DIM, "num_heads": 2, "num_head_channels": -1,
        "use_temporal_resblock": False, "use_temporal_attention": False,
    }
    config.update(overrides)
    return config


def tiny_model(in_channels: int = 4, seed: int = 0, family: str = "SD15", **overrides):
    """A ModelPatcher around a tiny random UNet built through ComfyUI's supported_models classes."""
    import comfy.supported_models

    config = tiny_unet_config(in_channels, **overrides)
    return _patcher(getattr(comfy.supported_models, family)(config), {}, seed)


def _patcher(model_config, state_dict: dict, seed: int):
    """Build the model of a supported_models config, seed its weights, wrap it in a ModelPatcher."""
    import comfy.model_management
    import comfy.model_patcher

    model = model_config.get_model(state_dict)
    _init_(model.diffusion_model, seed)
    model.diffusion_model.eval()
    return comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


def composite_keeps_target(image, band, target) -> bool:
    """An HA_DetailPreservingComposite output (image, blend_mask `band`) has pixels on both sides of its band and
    is its target bit for bit outside it."""
    import torch

    outside = (band == 0)[..., None].expand_as(image)
    return bool(band.any() and outside.any() and torch.equal(image[outside], target[outside]))


def tiny_vae(seed: int = 0, z_channels: int = 4):
    """A small AutoencoderKL (4 latent channels, or 16 like Flux's and SD3's; 8x downscale like SD's) through
    comfy.sd.VAE."""
    import torch
    import comfy.ldm.models.autoencoder
    import comfy.sd

    ddconfig = {
        "double_z": True, "z_channels": z_channels, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
        "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
    }
    model = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=z_channels)
    gen = torch.Generator().manual_seed(seed)
    def value(key, v):
        if v.ndim > 1:
            return torch.randn(v.shape, generator=gen) * 0.05
        return torch.ones_like(v) if "norm" in key and key.endswith("weight") else torch.zeros_like(v)

    sd = {k: value(k, v) for k, v in model.state_dict().items()}
    vae = comfy.sd.VAE(sd=sd, config={"params": {"ddconfig": ddconfig, "embed_dim": z_channels}})
    vae.latent_channels = z_channels
    return vae


def tiny_clip(seed: int = 0):
    """A reduced CLIP-L text encoder (hidden size TINY_CONTEXT_DIM) through comfy.sd.CLIP."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    textmodel_json_config = {
        "hidden_act": "quick_gelu", "hidden_size": TINY_CONTEXT_DIM, "intermediate_size": 64,
        "num_attention_heads": 2, "num_hidden_layers": 2, "max_position_embeddings": 77,
        "vocab_size": 49408, "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407,
        "projection_dim": TINY_CONTEXT_DIM, "model_type": "clip_text_model",
    }

    class TinyClipModel(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options=None, **kwargs):
            model_options = {**(model_options or {}), "clip_l_model_config": textmodel_json_config}
            super().__init__(device=device, dtype=dtype, model_options=model_options, **kwargs)

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, TinyClipModel)
    clip = comfy.sd.CLIP(target=target)
    _init_(clip.cond_stage_model, seed)
    return clip


# ---------------------------------------------------------------- test-only nodes

def register_test_nodes(models: dict) -> None:
    """Test-only nodes: HATest_TinyCheckpoint (MODEL, CLIP, VAE from `models`, keyed by ckpt_name),
    HATest_Image (a deterministic test image) and HATest_Keep (an output node for any value)."""
    import nodes
    from comfy_api.latest import io

    class TinyCheckpoint(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="HATest_TinyCheckpoint", category="_for_testing",
                             inputs=[io.String.Input("ckpt_name")],
                             outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()])

        @classmethod
        def execute(cls, ckpt_name):
            return io.NodeOutput(*models[ckpt_name])

    class TestImage(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="HATest_Image", category="_for_testing",
                             inputs=[io.String.Input("name"), io.Int.Input("width"), io.Int.Input("height")],
                             outputs=[io.Image.Output()])

        @classmethod
        def execute(cls, name, width, height):
            return io.NodeOutput(make_image(name, width, height))

    class Keep(io.ComfyNode):
        """An output node that keeps any value, so graphs without a Save node can run."""

        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="HATest_Keep", category="_for_testing", is_output_node=True,
                             inputs=[io.AnyType.Input("value")], outputs=[])

        @classmethod
        def execute(cls, value):
            return io.NodeOutput()

    for cls in (TinyCheckpoint, TestImage, Keep):
        nodes.NODE_CLASS_MAPPINGS[cls.GET_SCHEMA().node_id] = cls


def make_image(name: str, width: int, height: int):
    """Deterministic RGB images: 'checker' (a texture), 'noise:<seed>', 'gradient'."""
    import torch

    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    if name == "checker":
        c = (((x // 8) + (y // 8)) % 2).float()
        img = torch.stack([0.3 + 0.4 * c, 0.5 - 0.2 * c, 0.2 + 0.1 * c], -1)
    elif name == "gradient":
        img = torch.stack([x / max(1, width - 1), y / max(1, height - 1), 0.5 + 0 * x], -1).float()
    elif name.startswith("noise:"):
        gen = torch.Generator().manual_seed(int(name.split(":")[1]))
        img = torch.rand((height, width, 3), generator=gen)
    else:
        raise ValueError(f"unknown test image {name!r}")
    return img[None].float()


# ---------------------------------------------------------------- other model families (SDXL, SD2.x)

TINY_POOLED_DIM = 32  # clip_g's projection; SDXL's ADM input is pooled + 6 x 256 size embeddings


def tiny_sdxl_unet_config(in_channels: int = 4, **overrides) -> dict:
    """SDXL's layout, reduced in width (32, 32, 64 channels): no attention at full latent size, depth 2 at 1/2 and
    10 at 1/4 (the real model's depths), context = clip_l + clip_g widths, ADM = pooled + size embeddings."""
    config = tiny_unet_config(
        in_channels, model_channels=32, channel_mult=[1, 1, 2], num_res_blocks=[2, 2, 2],
        transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
        transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2 * TINY_CONTEXT_DIM,
        adm_in_channels=TINY_POOLED_DIM + 6 * 256, num_classes="sequential",
    )
    config.update(overrides)
    return config


def tiny_family_model(family: str, in_channels: int = 4, seed: int = 0, v_prediction: bool = False, **overrides):
    """A ModelPatcher around a tiny random UNet of `family` ("SDXL" or "SD20"), built through ComfyUI's
    supported_models class, so model_base class, latent format, model sampling and inpainting set-up are
    ComfyUI's own. SD20's v-prediction is detected from a state dict: one carrying the key it reads."""
    import comfy.supported_models
    import torch

    if family == "SDXL":
        config = tiny_sdxl_unet_config(in_channels, **overrides)
    elif family == "SD20":
        config = tiny_unet_config(in_channels, use_linear_in_transformer=True, **overrides)
    else:
        raise ValueError(f"family {family!r}: tiny_family_model builds 'SDXL' or 'SD20'")
    model_config = getattr(comfy.supported_models, family)(config)
    # 64-channel heads (SD2, SDXL) would leave the tiny levels one head or none: 16-channel heads
    model_config.unet_config.update(num_heads=-1, num_head_channels=16)
    state_dict = {}
    if v_prediction:
        if family != "SD20":
            raise ValueError("v_prediction: only the SD20 route detects it from a state dict")
        state_dict["output_blocks.11.1.transformer_blocks.0.norm1.bias"] = torch.linspace(-1, 1, 8)
    return _patcher(model_config, state_dict, seed)


def tiny_sdxl_clip(seed: int = 0):
    """SDXL's two text encoders (clip_l + clip_g, 3 layers: both read the penultimate) through comfy.sd.CLIP,
    each TINY_CONTEXT_DIM wide:
    CLIPTextEncode then gives [cond (2 x TINY_CONTEXT_DIM wide), {"pooled_output": [1, TINY_POOLED_DIM]}]."""
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models_base

    def text_config(projection_dim):
        return {
            "hidden_act": "gelu", "hidden_size": TINY_CONTEXT_DIM, "intermediate_size": 64,
            "num_attention_heads": 2, "num_hidden_layers": 3, "max_position_embeddings": 77,
            "vocab_size": 49408, "layer_norm_eps": 1e-5, "projection_dim": projection_dim,
            "model_type": "clip_text_model",
        }

    class TinySDXLClipModel(comfy.sdxl_clip.SDXLClipModel):
        def __init__(self, device="cpu", dtype=None, model_options=None, **kwargs):
            model_options = {**(model_options or {}), "clip_l_model_config": text_config(TINY_CONTEXT_DIM),
                             "clip_g_model_config": text_config(TINY_POOLED_DIM)}
            super().__init__(device=device, dtype=dtype, model_options=model_options)

    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, TinySDXLClipModel)
    clip = comfy.sd.CLIP(target=target)
    _init_(clip.cond_stage_model, seed)
    return clip


def tiny_flux(seed: int = 0, in_channels: int = 16, guidance_embed: bool = False, depth: int = 1, single: int = 1,
              schnell: bool = False):
    """A tiny Flux through comfy.supported_models (Flux, FluxSchnell with `schnell`: its model sampling, or FluxInpaint
    for Fill's 96 = 16 latent + 16 masked image + 64 packed mask channels): hidden size 64, 2 heads, `depth` double
    and `single` single stream blocks. The config is built from FluxParams' own fields, so fields a ComfyUI version
    adds (txt_ids_dims) get a value."""
    import dataclasses

    import comfy.ldm.flux.model
    import comfy.supported_models

    config = {
        "image_model": "flux", "in_channels": in_channels, "out_channels": 16, "vec_in_dim": TINY_CONTEXT_DIM,
        "context_in_dim": TINY_CONTEXT_DIM, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": depth,
        "depth_single_blocks": single, "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True,
        "guidance_embed": guidance_embed,
    }
    defaults = {"txt_ids_dims": []}  # latest ComfyUI: which txt_ids axes count text positions (Flux.1: none)
    for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams):
        if f.name not in config and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            config[f.name] = defaults[f.name]
    family = (comfy.supported_models.FluxInpaint if in_channels == 96 else
              comfy.supported_models.FluxSchnell if schnell else comfy.supported_models.Flux)
    return _patcher(family(config), {}, seed)


def tiny_chroma(seed: int = 0, depth: int = 1, single: int = 1):
    """A tiny Chroma (Flux's blocks, modulation from its distilled-guidance approximator, no pooled vector) through
    comfy.supported_models.Chroma: hidden size 64, 2 heads, 64 patchified input channels (16 latent x 2 x 2). The
    config is built from ChromaParams' own fields, so fields a ComfyUI version adds get a value."""
    import dataclasses

    import comfy.ldm.chroma.model
    import comfy.supported_models

    config = {
        "image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": TINY_CONTEXT_DIM,
        "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": depth, "depth_single_blocks": single,
        "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True,
        "in_dim": 64, "out_dim": 64, "hidden_dim": 64, "n_layers": 1,  # the approximator: 64 in = 16 + 16 + 32
    }
    defaults = {"txt_ids_dims": [], "vec_in_dim": None}  # latest ComfyUI's extra fields (Chroma: unused)
    for f in dataclasses.fields(comfy.ldm.chroma.model.ChromaParams):
        if f.name not in config and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            config[f.name] = defaults[f.name]
    return _patcher(comfy.supported_models.Chroma(config), {}, seed)


def tiny_sd3(seed: int = 0, self_attention_layers=(0,)):
    """A tiny SD3 MMDiT through comfy.supported_models.SD3: depth 2 (hidden 128, 2 heads of 64), the last joint block
    context-only at its output as in SD3, RMS q/k norm, and SD3.5 Medium's extra image-only self-attention
    (x_block_self_attn) in `self_attention_layers`; context and pooled widths TINY_CONTEXT_DIM."""
    import torch
    import comfy.supported_models

    config = {
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
        "adm_in_channels": TINY_CONTEXT_DIM, "pos_embed_scaling_factor": None, "num_patches": 32 * 32,
        "pos_embed_max_size": 32, "qk_norm": "rms", "x_block_self_attn_layers": list(self_attention_layers),
        "context_embedder_config": {"target": "torch.nn.Linear",
                                    "params": {"in_features": TINY_CONTEXT_DIM, "out_features": 128}},
    }
    model = _patcher(comfy.supported_models.SD3(config), {}, seed)
    with torch.no_grad():  # a buffer, left uninitialised by ComfyUI
        pos = model.model.diffusion_model.pos_embed
        pos.copy_(torch.randn(pos.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return model


def tiny_flux2(seed: int = 0, depth: int = 1, single: int = 1, guidance_embed: bool = True):
    """A tiny Flux.2 through comfy.supported_models.Flux2 (ComfyUI's Flux2 model_base over its Flux transformer with
    global modulation, SiLU MLPs, no biases, text positions on axis 3): 128 latent channels (Flux.2's VAE packs 2x2
    cells of 32 channels) and patch 1, so one image token per latent cell of 16x16 pixels; hidden size 64, 2 heads."""
    import comfy.supported_models

    config = {
        "image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None,
        "context_in_dim": TINY_CONTEXT_DIM, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": depth,
        "depth_single_blocks": single, "axes_dim": [8, 8, 8, 8], "theta": 2000, "patch_size": 1, "qkv_bias": False,
        "guidance_embed": guidance_embed, "txt_ids_dims": [3], "global_modulation": True, "mlp_silu_act": True,
        "ops_bias": False, "default_ref_method": "index", "ref_index_scale": 10.0,
    }
    return _patcher(comfy.supported_models.Flux2(config), {}, seed)


def tiny_qwen_image(seed: int = 0, layers: int = 2):
    """A tiny Qwen-Image through comfy.supported_models.QwenImage: `layers` joint blocks (hidden 64, 2 heads of 32),
    2x2 patches of its 16-channel 5-D latents ([B, 16, 1, h, w], from the Wan VAE)."""
    import comfy.supported_models

    config = {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16,
              "num_layers": layers, "attention_head_dim": 32, "num_attention_heads": 2,
              "joint_attention_dim": TINY_CONTEXT_DIM, "axes_dims_rope": (8, 12, 12)}
    return _patcher(comfy.supported_models.QwenImage(config), {}, seed)


def tiny_z_image(seed: int = 0, layers: int = 2):
    """A tiny Z-Image through comfy.supported_models.ZImage (Lumina 2's NextDiT with Z-Image's modulation, caption and
    image padded to 32 tokens): one context and one noise refiner, `layers` joint layers; hidden 256 (Z-Image's
    modulation takes a 256-wide time embedding, so no narrower), 8 heads of 32, 2x2 patches of 16-channel latents."""
    import comfy.supported_models

    config = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "cap_feat_dim": TINY_CONTEXT_DIM,
              "n_layers": layers, "n_refiner_layers": 1, "n_heads": 8, "n_kv_heads": 8, "qk_norm": True,
              "axes_dims": [8, 12, 12], "axes_lens": [64, 64, 64], "rope_theta": 256.0, "ffn_dim_multiplier": 1.0,
              "multiple_of": 16, "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32}
    model = _patcher(comfy.supported_models.ZImage(config), {}, seed)
    import torch

    with torch.no_grad():  # the padding tokens: learned in the real model, ComfyUI leaves them uninitialised
        for name in ("x_pad_token", "cap_pad_token"):
            token = getattr(model.model.diffusion_model, name)
            token.copy_(torch.randn(token.shape, generator=torch.Generator().manual_seed(seed)))
    return model


def tiny_lumina2(seed: int = 0):
    """A tiny Lumina Image 2.0 (NextDiT without Z-Image's modulation or padding; 4 heads sharing 2 key/value heads)
    through comfy.supported_models.Lumina2, which 0.3.64 has too: hidden 64, one refiner each, two joint layers."""
    import comfy.supported_models

    config = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": TINY_CONTEXT_DIM,
              "n_layers": 2, "n_refiner_layers": 1, "n_heads": 4, "n_kv_heads": 2, "qk_norm": True,
              "axes_dims": [4, 6, 6], "axes_lens": [64, 64, 64], "ffn_dim_multiplier": 1.0,
              "multiple_of": 16}
    return _patcher(comfy.supported_models.Lumina2(config), {}, seed)


def _vae_weights(module, seed: int) -> dict:
    """Seeded weights for a VAE's state dict: small random kernels, unit norms and variances, zero biases."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    def value(key, v):
        if not v.is_floating_point():
            return v
        if key.endswith("running_var") or (v.ndim <= 1 and "norm" in key and key.endswith("weight")) or "gamma" in key:
            return torch.ones_like(v)
        return torch.randn(v.shape, generator=gen) * 0.05 if v.ndim > 1 else torch.zeros_like(v)

    return {k: value(k, v) for k, v in module.state_dict().items()}


def tiny_flux2_vae(seed: int = 0):
    """A small Flux.2 VAE through comfy.sd.VAE: an AutoencoderKL with 32 latent channels at 8x whose batch-norm latent
    packs 2x2 cells, so 128-channel latents at 16x, as Flux.2's."""
    import comfy.ldm.models.autoencoder
    import comfy.sd

    ddconfig = {"double_z": True, "z_channels": 32, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
                "batch_norm_latent": True}
    model = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=32)
    vae = comfy.sd.VAE(sd=_vae_weights(model, seed), config={"params": {"ddconfig": ddconfig, "embed_dim": 32}})
    vae.latent_channels, vae.downscale_ratio, vae.upscale_ratio = 128, 16, 16  # what ComfyUI's detection sets
    return vae


def tiny_wan_vae(seed: int = 0):
    """A small Wan 2.1 VAE (Qwen-Image's: 16 channels, 8x, 5-D latents) detected by comfy.sd.VAE from its state dict,
    as VAELoader would: base width 8 instead of 96."""
    import comfy.ldm.wan.vae
    import comfy.sd

    model = comfy.ldm.wan.vae.WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                     temperal_downsample=[False, True, True], dropout=0.0)
    return comfy.sd.VAE(sd=_vae_weights(model, seed))


def _wan_vae_any_width() -> bool:
    """Whether ComfyUI reads a Wan 2.1 VAE's width from its weights (0.3.64 builds the full-width one, seconds per
    64 px image on a CPU, whatever the file holds)."""
    import inspect

    import comfy.sd

    return "decoder.head.0.gamma" in inspect.getsource(comfy.sd.VAE.__init__)


# the newer DiT families: name -> (model builder, VAE builder, the comfy.supported_models class they need, whether this
# ComfyUI can build the tiny VAE)
TINY_FAMILIES = {
    "tiny-flux2": (lambda: tiny_flux2(seed=21, depth=1, single=1), lambda: tiny_flux2_vae(seed=8), "Flux2", None),
    "tiny-qwen-image": (lambda: tiny_qwen_image(seed=22), lambda: tiny_wan_vae(seed=9), "QwenImage",
                        _wan_vae_any_width),
    "tiny-z-image": (lambda: tiny_z_image(seed=23), lambda: tiny_vae(seed=7, z_channels=16), "ZImage", None),
}


def family_missing(name: str, vae: bool = False) -> str | None:
    """Why this ComfyUI cannot build TINY_FAMILIES[name] (its model class is newer), or with `vae` its tiny VAE; None
    when it can."""
    import comfy.supported_models
    import comfyui_version

    _, _, needs, vae_available = TINY_FAMILIES[name]
    if not hasattr(comfy.supported_models, needs):
        return f"ComfyUI {comfyui_version.__version__} has no {needs} model (comfy.supported_models.{needs})"
    if vae and vae_available is not None and not vae_available():
        return (f"ComfyUI {comfyui_version.__version__} builds this family's VAE only at its full size (a Wan 2.1 VAE "
                "of width 96, seconds per 64 px image on a CPU): no tiny one to run the pipeline with")
    return None


def tiny_family(name: str, clip=None):
    """(MODEL, CLIP, VAE) of TINY_FAMILIES[name]: the CLIP is the tiny CLIP-L (its width is every tiny model's context),
    the VAE None where this ComfyUI cannot build a tiny one (family_missing(name, vae=True))."""
    build, vae, _, _ = TINY_FAMILIES[name]
    return build(), clip or tiny_clip(), None if family_missing(name, vae=True) else vae()


def tiny_pixart(seed: int = 0):
    """A tiny PixArt-alpha through comfy.supported_models: a DiT whose self-attention bypasses transformer_options
    (no patch can take it over), so a family the pack refuses."""
    import comfy.supported_models

    config = {"image_model": "pixart_alpha", "hidden_size": 64, "depth": 1, "num_heads": 2,
              "caption_channels": TINY_CONTEXT_DIM, "input_size": 8, "patch_size": 2, "in_channels": 4,
              "pe_interpolation": 1.0}
    return _patcher(comfy.supported_models.PixArtAlpha(config), {}, seed)


def with_diffusion_wrapper(model, key, fn):
    """A clone of `model` with `fn` as a DIFFUSION_MODEL wrapper in its transformer_options, so it runs both
    in sampling and in direct apply_model calls with those options."""
    from comfy.patcher_extension import WrappersMP, add_wrapper_with_key

    clone = model.clone()
    add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, key, fn, clone.model_options, is_model_options=True)
    return clone


def direct_unet(model):
    """(model, context width) for direct UNet calls: SDXL gets its ADM input (pooled + size embeddings),
    which a sampler would build from the conditioning, injected where the caller gives none."""
    import comfy.model_base
    import torch

    context = model.model.model_config.unet_config["context_dim"]
    if not isinstance(model.model, comfy.model_base.SDXL):
        return model, context
    pooled = torch.randn(1, TINY_POOLED_DIM, generator=torch.Generator().manual_seed(0))
    adm = model.model.encode_adm(pooled_output=pooled, width=1024, height=768, crop_w=8, crop_h=16,
                                 target_width=1024, target_height=768)

    def with_adm(executor, x, timesteps, context, y, *args, **kwargs):
        y = adm.expand(x.shape[0], -1).to(x) if y is None else y
        return executor(x, timesteps, context, y, *args, **kwargs)

    return with_diffusion_wrapper(model, "ha-test-adm", with_adm), context
