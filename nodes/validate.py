"""Input checks shared by the nodes: each raises ValueError naming the values and the fix,
before any long computation starts."""
from __future__ import annotations

import inspect
import math

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


def source_mask(mask: torch.Tensor, source: torch.Tensor) -> None:
    """The source mask has the source's size. ComfyUI's Load Image gives an empty 64x64 MASK for an image without alpha
    (a JPEG, or a PNG never painted in the mask editor): say that, not "resize the mask"."""
    if tuple(mask.shape[-2:]) == (64, 64) and tuple(source.shape[1:3]) != (64, 64) and not mask.any():
        raise ValueError(
            f"source_mask is an empty 64x64 mask but source is {_hw(source)}: the source's Load Image gives that when "
            "its image has no painted mask (no alpha, e.g. a JPEG). Paint the crack in the mask editor (right-click the "
            "Load Image > Open in MaskEditor, paint, Save), or connect a Load Image (as Mask) of a mask file")
    same_size("source_mask", mask, "source", source, "resize the mask to the image (e.g. with ImageScale / a mask resize node)")


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


# ---------------------------------------------------------------- widget values, before the prompt runs

def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else repr(value)


def float_error(name: str, value, spec: dict) -> str | None:
    """What is wrong with a FLOAT widget's value (NaN, infinite, outside [min, max]), or None. `spec` is the input's
    options (min, max, default); None (a linked input, known only when the graph runs) passes."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    low, high, default = spec.get("min"), spec.get("max"), spec.get("default")
    span = " ".join(filter(None, (f"from {_number(low)}" if low is not None else "",
                                  f"to {_number(high)}" if high is not None else "")))
    fix = f"set it to a number {span}".rstrip() + (f" (default {_number(default)})" if default is not None else "")
    if math.isnan(value):
        return f"{name} is NaN (not a number): {fix}"
    if math.isinf(value):
        return f"{name} is {value}: {fix}"
    if low is not None and value < low:  # ComfyUI's own wording for its range check
        return f"{name}: Value {value} smaller than min of {low}; {fix}"
    if high is not None and value > high:
        return f"{name}: Value {value} bigger than max of {high}; {fix}"
    return None


def finite_widgets(node: type) -> type:
    """Give a node class a validate_inputs that refuses a NaN, infinite or out-of-range value of any of its FLOAT
    widgets, naming the node, the input, the value and the fix, and then runs the node's own validate_inputs (if any).
    Applied to every node of the pack where it registers (nodes/__init__.py).

    ComfyUI calls validate_inputs from validate_prompt, before any node of the prompt executes, so a bad number never
    costs an inversion. Its own range check lets NaN through (NaN < min and NaN > max are both false) and is skipped
    for every input a validate_inputs names; this one names the FLOAT inputs (and the own validator's) and checks
    their range itself, leaving ComfyUI's checks of every other input as they are. A value from a link is not known
    before the run: the nodes' execute checks what it must."""
    own = node.__dict__.get("validate_inputs")
    own = own.__func__ if isinstance(own, classmethod) else None
    if getattr(own, "finite_widgets", False):
        return node
    types = node.INPUT_TYPES()
    floats = {name: spec[1] if len(spec) > 1 else {} for group in ("required", "optional")
              for name, spec in types.get(group, {}).items() if spec[0] == "FLOAT"}
    if not floats:
        return node
    own_names = [p for p in inspect.signature(own).parameters if p != "cls"] if own else []
    schema = node.GET_SCHEMA()
    label = f"{schema.display_name} ({schema.node_id})" if schema.display_name else schema.node_id

    def validate_inputs(cls, **values):
        for name, spec in floats.items():
            message = float_error(name, values.get(name), spec)
            if message:
                return f"{label}: {message}"
        return own(cls, **{k: v for k, v in values.items() if k in own_names}) if own else True

    # ComfyUI passes a validate_inputs the inputs its signature names (a **kwargs would switch its checks off for all)
    names = list(floats) + [n for n in own_names if n not in floats]
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    validate_inputs.__signature__ = inspect.Signature(
        [inspect.Parameter("cls", kind)] + [inspect.Parameter(n, kind, default=None) for n in names])
    validate_inputs.finite_widgets = True
    node.validate_inputs = classmethod(validate_inputs)
    return node
