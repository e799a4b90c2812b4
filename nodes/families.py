"""What the pack knows about each model family, in one place.

Every diffusion transformer (DiT) goes through the same engine and the same model-agnostic hooks
(nodes/patch.py: an APPLY_MODEL wrapper, a patches_replace["dit"] replace where the model has one, the
optimized_attention_override); a `DitFamily` says what differs:

- which model it is: its comfy.model_base class, taken by exact type (a subclass may lay out its tokens
  otherwise: ChromaRadiance works in pixel space, ZImagePixelSpace too, LongCatImage shifts its positions);
- its joint-attention blocks in call order: the diffusion model's ModuleLists and their patches_replace["dit"]
  kind; the i-th of n sits at depth i / n (the nodes' dit_block_start / dit_block_end);
- how a layer call learns which block it runs in: the pack's own patches_replace["dit"] replace on the block
  (Flux.1, Flux.2, Chroma, SD3, Qwen-Image), or the block_type / block_index the model's forward writes into
  transformer_options (Z-Image's NextDiT, which offers no block replace);
- its token layout: every family's joint attention is [text; image; other] (other: a NextDiT's padding to a
  multiple of 32 tokens), or the image tokens alone (SD3.5's extra self-attention). The image tokens are the
  latent patchified p x p (p: the diffusion model's patch_size), row-major; the text length is the block's
  "txt" input where the pack's replace sees it, else the context's length as the model pads it (`text_tokens`);
- what the family needs checked before a run (`check`): channels of a control model, a layered model, a ComfyUI
  whose forward does not say which layer runs.

The pixel step of image sizes (`pixel_step`) follows: the VAE's downscale times the patch.
UNets (SD1.x / SD2.x / SDXL) need none of this: ComfyUI's attn1 replace names each layer (patch.py).
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import comfy.model_base


class UnsupportedModel(ValueError):
    pass


def _no_check(model) -> None:
    pass


def _same_length(dit, tokens: int) -> int:
    return tokens


@dataclass(frozen=True)
class DitFamily:
    name: str  # as users know it, for messages
    model_base: str  # comfy.model_base class name, matched by exact type
    blocks: tuple[tuple[str, str], ...]  # (the diffusion model's ModuleList, its patches_replace["dit"] kind), in call order
    # None: the pack's patches_replace["dit"] replace places a layer call; else the forward names each joint block in
    # transformer_options as block_type == this, block_index == i (NextDiT: "double"; its refiners run with neither)
    named_blocks: str | None = None
    text_input: str = "txt_in"  # the diffusion model's layer whose in_features is the text tokens' width
    text_tokens: Callable[[object, int], int] = _same_length  # (diffusion model, context tokens) -> text tokens
    width: str = "hidden_size"  # the diffusion model's attribute holding its joint attention's width (heads x head dim)
    check: Callable[[object], None] = _no_check  # raises UnsupportedModel for what the pack cannot take

    def model_class(self):
        return getattr(comfy.model_base, self.model_base, None)  # None: this ComfyUI has no such model


def _name(model) -> str:
    """The model's family as ComfyUI names it, e.g. SDXL, Flux, SD3, QwenImage."""
    return type(getattr(model.model, "model_config", model.model)).__name__


def _config(model) -> dict:
    return model.model.model_config.unet_config


def _flux_channels(model) -> None:
    config = _config(model)
    channels, out = config.get("in_channels"), config.get("out_channels", 16)
    if channels not in (out, out * 2 + out * 4):  # plain, or Fill: latent + masked image + 8x8 mask
        raise UnsupportedModel(
            f"this {_name(model)} model takes {channels} input channels: a Flux control model (Depth / Canny / "
            "Redux-style image concat) needs its own control image, which the pack does not give. Load Flux.1 "
            "dev / schnell or Flux.1 Fill.")


def _flux2_channels(model) -> None:
    config = _config(model)
    if config.get("in_channels") != config.get("out_channels"):
        raise UnsupportedModel(
            f"this Flux.2 model takes {config.get('in_channels')} input channels for {config.get('out_channels')} "
            "output channels: an image-concat variant, whose extra input the pack does not give. Load Flux.2 dev "
            "or Klein.")


def _qwen_single_image(model) -> None:
    if _config(model).get("use_additional_t_cond", False):
        raise UnsupportedModel(
            "this is Qwen-Image-Layered: it generates a stack of RGBA layers (the frames of a 5-D latent), not one "
            "image, so a geometry region has no single place in it. Load Qwen-Image or Qwen-Image-Edit.")


def _nextdit_names_its_layers(model) -> None:
    # The family has no patches_replace["dit"]: a layer call is placed by the block_index its forward writes into
    # transformer_options, which ComfyUI 0.3.64's NextDiT does not write (every call would run unpatched).
    forward = getattr(type(model.get_model_object("diffusion_model")), "_forward", None)
    try:
        names = forward is not None and 'transformer_options["block_index"]' in inspect.getsource(forward)
    except (OSError, TypeError):
        names = False
    if not names:
        raise UnsupportedModel(
            "this ComfyUI's Lumina 2 / Z-Image model (NextDiT) does not tell its attention which layer runs "
            "(transformer_options['block_index'], written from the ComfyUI versions that load Z-Image on), so the "
            "pack cannot place its rules in it: update ComfyUI to use Z-Image with the pack.")


def _nextdit_text(dit, tokens: int) -> int:
    """NextDiT pads the caption to a multiple of pad_tokens_multiple (Z-Image: 32; Lumina 2: none)."""
    multiple = getattr(dit, "pad_tokens_multiple", None)
    return math.ceil(tokens / multiple) * multiple if multiple else tokens


FLUX_BLOCKS = (("double_blocks", "double_block"), ("single_blocks", "single_block"))

FAMILIES = (
    DitFamily("Flux.1 (dev, schnell, Fill)", "Flux", FLUX_BLOCKS, check=_flux_channels),
    DitFamily("Flux.2 (dev, Klein)", "Flux2", FLUX_BLOCKS, check=_flux2_channels),
    # Flux's double and single stream blocks and block patches; modulation from its own approximator
    DitFamily("Chroma", "Chroma", FLUX_BLOCKS),
    DitFamily("SD3.x", "SD3", (("joint_blocks", "double_block"),), text_input="context_embedder"),
    # Qwen-Image and its Edit checkpoints (the same transformer), prompted as text-to-image models
    DitFamily("Qwen-Image (and Qwen-Image-Edit)", "QwenImage", (("transformer_blocks", "double_block"),),
              width="inner_dim", check=_qwen_single_image),
    # Lumina 2's NextDiT: context and noise refiners first (text alone, image alone: left plain), then the joint layers
    DitFamily("Z-Image (Lumina 2's NextDiT)", "Lumina2", (("layers", "double_block"),), named_blocks="double",
              text_input="cap_embedder.1", text_tokens=_nextdit_text, width="dim", check=_nextdit_names_its_layers),
)

DIT_NAMES = ", ".join(f.name for f in FAMILIES[:-1]) + " or " + FAMILIES[-1].name
SUPPORTED = "SD1.x / SD2.x / SDXL UNets (and their inpainting versions), " + DIT_NAMES


def family(model) -> DitFamily | None:
    """The model's DiT family (exact model class), or None for a UNet or a family the pack refuses."""
    kind = type(model.model)
    return next((f for f in FAMILIES if f.model_class() is kind), None)


def is_dit(model) -> bool:
    return family(model) is not None


def model_name(model) -> str:
    return _name(model)


def dit_blocks(model) -> list[tuple[str, int]]:
    """ComfyUI's patches_replace["dit"] keys of the model's joint-attention blocks, in call order (Flux: ("double_block",
    i) then ("single_block", i); SD3, Qwen-Image, Z-Image: ("double_block", i)), after the family's checks."""
    fam = family(model)
    fam.check(model)
    dit = model.get_model_object("diffusion_model")
    keys = [(kind, i) for name, kind in fam.blocks for i in range(len(getattr(dit, name, ())))]
    if not keys:
        raise UnsupportedModel(f"this {_name(model)} model ({type(dit).__name__}) has no joint-attention block to patch")
    return keys


def patch_size(model) -> int:
    """Latent cells per image token side: a DiT's patch (Flux.1, SD3, Qwen-Image, Z-Image: 2; Flux.2: 1); 1 for a UNet."""
    if not is_dit(model):
        return 1
    return int(getattr(model.get_model_object("diffusion_model"), "patch_size", 2))


def token_grid(latent_hw, patch: int) -> tuple[int, int]:
    """(h, w) image tokens of a latent of latent_hw (h, w) cells patchified patch x patch (patch_size), padded up as a
    DiT pads its latent."""
    h, w = (math.ceil(int(v) / patch) for v in latent_hw)
    return h, w


def token_width(model) -> int:
    """Channels of one image token's key (or value) in a DiT's joint attention: heads x head dim (Flux.1: 3072)."""
    return int(getattr(model.get_model_object("diffusion_model"), family(model).width))


def vae_step(model) -> int:
    """Pixels per latent cell side of the model's latent format (8; Flux.2's: 16)."""
    return int(getattr(model.model.latent_format, "spacial_downscale_ratio", 8))


def pixel_step(model) -> int:
    """Image sides must be multiples of this for `model`: the VAE's downscale times a DiT's patch (8 for UNets, 16 for
    Flux.1 / SD3 / Qwen-Image / Z-Image (8 x 2) and Flux.2 (16 x 1)), so that every latent cell and image token covers
    whole pixels of the masks and no DiT pads its latent (which would shift its token grid)."""
    return vae_step(model) * patch_size(model)


def native_size(model) -> int:
    """The side of the square images the model was trained at (the working region's working_size for it): 1024 for
    SDXL and the DiTs, 768 for SD2.x v-prediction, 512 for SD1.x and SD2.x base."""
    import comfy.supported_models

    inner = model.model
    if is_dit(model) or isinstance(inner, (comfy.model_base.SDXL, comfy.model_base.SDXLRefiner)):
        return 1024
    v_prediction = inner.model_type == comfy.model_base.ModelType.V_PREDICTION
    if isinstance(inner.model_config, comfy.supported_models.SD20) and v_prediction:
        return 768
    return 512


def text_width(model) -> int | None:
    """The width of the text tokens a DiT's text input takes (None when the layer does not say: a quantised one)."""
    fam = family(model)
    if fam is None:
        return None
    layer = model.get_model_object("diffusion_model")
    for part in fam.text_input.split("."):
        layer = getattr(layer, part, None) if not part.isdigit() else layer[int(part)]
    return getattr(layer, "in_features", None)


def latent_dims(model) -> int:
    """Spatial(-temporal) dims of the model's latents: 2 ([B, C, H, W]) or 3 (Qwen-Image's Wan VAE: [B, C, T, H, W])."""
    return int(getattr(model.model.latent_format, "latent_dimensions", 2))


def is_inpainting(model) -> bool:
    """SD-style inpainting UNets (mask + masked image concat) and Flux Fill (masked image + packed mask)."""
    if type(model.model) is comfy.model_base.Flux:
        config = _config(model)
        return config.get("in_channels", 16) > 2 * config.get("out_channels", 16)
    return tuple(getattr(model.model, "concat_keys", ())) == ("mask", "masked_image")
