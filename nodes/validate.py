"""Input checks shared by the nodes: each raises ValueError naming the values and the fix,
before any long computation starts."""
from __future__ import annotations

import torch

from .patch import dit_blocks, is_dit, is_inpainting, self_attention_blocks


def _hw(t: torch.Tensor) -> str:
    return f"{t.shape[-2]}x{t.shape[-3]}" if t.ndim == 4 else f"{t.shape[-1]}x{t.shape[-2]}"


def image(name: str, t: torch.Tensor) -> None:
    if t.ndim != 4 or t.shape[-1] not in (3, 4):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; an IMAGE is [batch, height, width, 3]")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite pixels: fix the node that produced it")


def mask(name: str, t: torch.Tensor) -> None:
    if t.ndim != 3:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; a MASK is [batch, height, width]")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values: fix the node that produced it")


def same_size(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor, fix: str) -> None:
    if (a.shape[-3:-1] if a.ndim == 4 else a.shape[-2:]) != (b.shape[-3:-1] if b.ndim == 4 else b.shape[-2:]):
        raise ValueError(f"{a_name} is {_hw(a)} (WxH) but {b_name} is {_hw(b)}: {fix}")


def batches(a_name: str, a: int, b_name: str, b: int) -> None:
    if a != b and 1 not in (a, b):
        raise ValueError(
            f"{a_name} has a batch of {a} but {b_name} has {b}: give one of them a single image, or both the same count"
        )


def latent_size(name: str, t: torch.Tensor, multiple: int = 8) -> None:
    h, w = t.shape[-3:-1]
    if h % multiple or w % multiple:
        raise ValueError(
            f"{name} is {w}x{h}: width and height must be multiples of {multiple} for the VAE"
            f"{'' if multiple == 8 else ' and the 2x2 patches of the model'}; "
            f"resize or crop it (e.g. to {w // multiple * multiple}x{h // multiple * multiple})"
        )


def pixel_multiple(model) -> int:
    """Image sides must be multiples of this: the VAE's 8, times a DiT's 2x2 patches (16), so that every image
    token covers whole pixels of the masks (a DiT pads an odd latent, which would shift its token grid)."""
    return 16 if is_dit(model) else 8


def native_size(model) -> int:
    """The side of the square images the model was trained at: the working region's working_size for it."""
    import comfy.model_base
    import comfy.supported_models

    inner = model.model
    if is_dit(model) or isinstance(inner, (comfy.model_base.SDXL, comfy.model_base.SDXLRefiner)):
        return 1024
    v_prediction = inner.model_type == comfy.model_base.ModelType.V_PREDICTION
    if isinstance(inner.model_config, comfy.supported_models.SD20) and v_prediction:
        return 768
    return 512


def unet(model) -> None:
    """The model is a UNet or a diffusion transformer (Flux.1, Flux.1 Fill, SD3.x) we can patch; any other
    family is refused with its name."""
    if is_dit(model):
        dit_blocks(model)
        return
    self_attention_blocks(model)
    in_channels = model.model.model_config.unet_config.get("in_channels")
    if in_channels not in (4, 9):
        raise ValueError(
            f"this UNet takes {in_channels} input channels; the pack handles 4-channel models and "
            "9-channel inpainting models"
        )
    if in_channels == 9 and not is_inpainting(model):
        raise ValueError("this 9-channel UNet is not set up as an inpainting model: load it with CheckpointLoaderSimple")


def inpaint_conditioning_free(conditioning, node: str) -> None:
    """Our nodes build each row's inpainting conditioning; a prebuilt one would be silently replaced."""
    for _, extra in conditioning:
        if "concat_latent_image" in extra or "concat_mask" in extra:
            raise ValueError(
                f"the conditioning given to {node} already carries inpainting inputs (from InpaintModelConditioning): "
                "connect the CLIPTextEncode output directly; the node sets each row's mask and masked image itself"
            )


# text encoders by the width of their token embeddings (the conditioning's last dimension)
TEXT_ENCODERS = {
    768: "CLIP-L, as SD1.x uses",
    1024: "OpenCLIP ViT-H, as SD2.x uses",
    1280: "OpenCLIP ViT-bigG alone, as the SDXL refiner uses",
    2048: "CLIP-L + OpenCLIP ViT-bigG, as SDXL uses",
    4096: "T5-XXL, as Flux and SD3 use",
}


def _encoder(width: int) -> str:
    return TEXT_ENCODERS.get(width, "an unusual text encoder")


def conditioning_width(model, conditioning, name: str) -> None:
    """The conditioning's tokens are as wide as the model's cross-attention expects: an SDXL prompt in an SD1.5
    model would otherwise fail as a matrix-shape error deep inside sampling."""
    config = model.model.model_config.unet_config
    expected = config.get("context_dim") or config.get("context_in_dim")
    if not expected:
        return
    for cond, _ in conditioning:
        width = cond.shape[-1]
        if width != expected:
            raise ValueError(
                f"{name} has {width}-wide text tokens ({_encoder(width)}) but this model's cross-attention takes "
                f"{expected}-wide tokens ({_encoder(expected)}): encode the prompt with the text encoder of this "
                "model's checkpoint (connect the CLIP output of the loader that gives this MODEL to CLIPTextEncode)"
            )
