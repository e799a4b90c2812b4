"""Input checks shared by the nodes: each raises ValueError naming the values and the fix,
before any long computation starts."""
from __future__ import annotations

import torch

from . import families
from .patch import self_attention_blocks


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


def latent_size(name: str, t: torch.Tensor, model) -> None:
    """The image's sides are multiples of the model's pixel step (families.pixel_step)."""
    h, w = t.shape[-3:-1]
    multiple, patch = families.pixel_step(model), families.patch_size(model)
    if h % multiple or w % multiple:
        raise ValueError(
            f"{name} is {w}x{h}: width and height must be multiples of {multiple} for the VAE"
            f"{f' and the {patch}x{patch} patches of the model' if patch > 1 else ''}; "
            f"resize or crop it (e.g. to {w // multiple * multiple}x{h // multiple * multiple})"
        )


def unet(model) -> None:
    """The model is a UNet or a diffusion transformer of families.FAMILIES we can patch; any other family is refused
    with its name."""
    if families.is_dit(model):
        families.dit_blocks(model)
        return
    self_attention_blocks(model)
    in_channels = model.model.model_config.unet_config.get("in_channels")
    if in_channels not in (4, 9):
        raise ValueError(
            f"this UNet takes {in_channels} input channels; the pack handles 4-channel models and "
            "9-channel inpainting models"
        )
    if in_channels == 9 and not families.is_inpainting(model):
        raise ValueError("this 9-channel UNet is not set up as an inpainting model: load it with CheckpointLoaderSimple")


def vae(model, vae) -> None:
    """The VAE makes the latents the model takes ([B, C, H, W], or [B, C, T, H, W] for Qwen-Image's Wan VAE): another
    model's VAE would fail as a shape error inside sampling."""
    want = (model.model.latent_format.latent_channels, families.latent_dims(model))
    got = (getattr(vae, "latent_channels", want[0]), getattr(vae, "latent_dim", 2))
    if got != want:
        shape = lambda c, d: f"{c}-channel {'video (5-D)' if d == 3 else 'image'} latents"  # noqa: E731
        raise ValueError(f"the VAE makes {shape(*got)} but this {families.model_name(model)} model takes "
                         f"{shape(*want)}: connect the VAE of this model's checkpoint (the VAELoader file that comes "
                         "with it)")


def inpaint_conditioning_free(conditioning, node: str) -> None:
    """Our nodes build each row's inpainting conditioning; a prebuilt one would be silently replaced. Nor may it carry
    reference images (their tokens would be the same in every row, whatever image the row holds)."""
    for _, extra in conditioning:
        if extra.get("reference_latents") is not None:
            raise ValueError(
                f"the conditioning given to {node} carries reference images (reference_latents, from ReferenceLatent / "
                "TextEncodeQwenImageEdit(Plus) / a Kontext or Flux.2 reference node): every row of the transfer would "
                "see that one image, whatever image the row holds. Connect a plain CLIPTextEncode: the pack gives the "
                "model its images itself (an Edit checkpoint then works as a text-to-image model)"
            )
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
    4096: "T5-XXL, as Flux.1 and SD3 use",
    2560: "Qwen3 4B, as Z-Image uses",
    3584: "Qwen2.5-VL 7B, as Qwen-Image uses",
    7680: "Qwen3 4B (3 layers), as Flux.2 Klein 4B uses",
    12288: "Qwen3 8B (3 layers), as Flux.2 Klein 9B uses",
    15360: "Mistral Small 3.1 24B (3 layers), as Flux.2 dev uses",
}


def _encoder(width: int) -> str:
    return TEXT_ENCODERS.get(width, "an unusual text encoder")


def conditioning_width(model, conditioning, name: str) -> None:
    """The conditioning's tokens are as wide as the model's cross-attention expects: an SDXL prompt in an SD1.5
    model would otherwise fail as a matrix-shape error deep inside sampling."""
    config = model.model.model_config.unet_config
    expected = config.get("context_dim") or config.get("context_in_dim") or families.text_width(model)
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
