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
