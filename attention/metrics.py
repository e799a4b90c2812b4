"""Evaluation metrics of a composite, as the papers define them (images [B,H,W,3] in [0,1], masks [B,H,W]).

Pixel metrics (DiffHarmony++ 5.1.3, after iHarmony4's evaluation: RGB, 0..255 scale):
- MSE  = mean over pixels and channels of (255 a - 255 b)^2, per image;
- PSNR = 10 log10(255^2 / MSE), per image (inf for identical images);
- fMSE = MSE inside the foreground mask only: sum over mask pixels and channels / (3 * mask pixels).

Region views of Harmonizing Attention's Table 2 (section 4.2 defines (bg) as "the composite image
background" and (fg) as "the local region of the stretched and harmonized image"; it does not say how the
region is cut out, so this is our reading):
- background: both images with the foreground (M_geo) set to 0 (black), at full size;
- foreground: both images cropped to the bounding box of M_geo (the local region), unmasked.

Perceptual metrics need pretrained backbones (LPIPS: AlexNet + the lpips package's linear heads; DISTS:
VGG16 + the DISTS_pytorch package's weights; CLIP: a CLIP image encoder). `load_backbones` never builds a
backbone with random weights: what is missing is reported as a message saying what to install.
"""
from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

PERCEPTUAL = ("lpips", "dists", "clip")
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
EVAL_EXTRA = 'pip install "comfyui-harmonizing-attention[eval]"  (lpips, DISTS_pytorch, transformers)'


def _check(a: Tensor, b: Tensor, mask: Tensor | None = None) -> None:
    if a.shape != b.shape or a.dim() != 4 or a.shape[-1] != 3:
        raise ValueError(f"images must both be [B,H,W,3], got {tuple(a.shape)} and {tuple(b.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(a.shape[:3]):
        raise ValueError(f"mask is {tuple(mask.shape)} but the images are {tuple(a.shape[:3])}: give one [H,W] "
                         "mask per image at the image size")


def mse(a: Tensor, b: Tensor) -> Tensor:
    """[B] mean squared error on the 0..255 scale over all pixels and RGB channels."""
    _check(a, b)
    return ((a.double() - b.double()) * 255.0).pow(2).mean(dim=(1, 2, 3))


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """[B] PSNR in dB with peak 255 (inf where the images are identical)."""
    return 10.0 * torch.log10(255.0 ** 2 / mse(a, b))


def fmse(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """[B] MSE inside the binary foreground mask (0..255 scale); nan where the mask is empty."""
    _check(a, b, mask)
    m = (mask >= 0.5).double()[..., None]
    err = ((a.double() - b.double()) * 255.0).pow(2) * m
    area = m.sum(dim=(1, 2, 3)) * 3
    return torch.where(area > 0, err.sum(dim=(1, 2, 3)) / area.clamp_min(1), torch.full_like(area, math.nan))


def pixel_metrics(output: Tensor, reference: Tensor, mask: Tensor) -> dict[str, Tensor]:
    return {"psnr": psnr(output, reference), "mse": mse(output, reference), "fmse": fmse(output, reference, mask)}


def background(image: Tensor, mask: Tensor) -> Tensor:
    """The image with the foreground (mask >= 0.5) blacked out."""
    return image * (mask < 0.5).to(image.dtype)[..., None]


def bbox(mask: Tensor) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1), end-exclusive, of the binary [H,W] mask."""
    region = mask >= 0.5
    ys, xs = torch.nonzero(region.any(dim=1)).flatten(), torch.nonzero(region.any(dim=0)).flatten()
    if ys.numel() == 0:
        raise ValueError("the foreground mask is empty: there is no foreground region to evaluate")
    return int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1


def foreground(image: Tensor, mask: Tensor) -> Tensor:
    """[1,h,w,3] crop of one image [1,H,W,3] (or [H,W,3]) to the bounding box of its [H,W] mask."""
    y0, y1, x0, x1 = bbox(mask)
    image = image if image.dim() == 4 else image[None]
    return image[:, y0:y1, x0:x1]


# ---------------------------------------------------------------- perceptual metrics

Metric = Callable[[Tensor, Tensor], Tensor]  # (a, b) [1,h,w,3] in [0,1] -> [1] score


def _torchvision_weights(name: str) -> str | None:
    """Path of a torchvision ImageNet checkpoint in torch's hub cache, or None if it is not there."""
    import torchvision

    url = getattr(torchvision.models, name).IMAGENET1K_V1.url
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    return path if os.path.isfile(path) else None


def _nchw(x: Tensor, device) -> Tensor:
    return x.permute(0, 3, 1, 2).float().to(device)


def _at_least(x: Tensor, side: int) -> Tensor:
    """Upscale [B,C,h,w] so its shorter side is >= side (small crops would vanish in VGG/AlexNet pooling)."""
    short = min(x.shape[-2:])
    if short >= side:
        return x
    scale = side / short
    size = (max(side, round(x.shape[-2] * scale)), max(side, round(x.shape[-1] * scale)))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def _lpips(device, allow_download: bool) -> Metric:
    if importlib.util.find_spec("lpips") is None:
        raise LookupError(f"LPIPS needs the package lpips: {EVAL_EXTRA}")
    if not allow_download and _torchvision_weights("AlexNet_Weights") is None:
        raise LookupError("LPIPS needs torchvision's pretrained AlexNet (alexnet-owt-7be5be79.pth) in "
                          f"{torch.hub.get_dir()}/checkpoints: run once with --allow-download on a machine with "
                          "network access, or copy the file there")
    import lpips

    net = lpips.LPIPS(net="alex", verbose=False).to(device).eval()

    def metric(a, b):
        with torch.no_grad():
            score = net(_at_least(_nchw(a, device), 64), _at_least(_nchw(b, device), 64), normalize=True)
        return score.reshape(-1).cpu()

    return metric


def _dists(device, allow_download: bool) -> Metric:
    if importlib.util.find_spec("DISTS_pytorch") is None:
        raise LookupError(f"DISTS needs the package DISTS_pytorch: {EVAL_EXTRA}")
    if not allow_download and _torchvision_weights("VGG16_Weights") is None:
        raise LookupError("DISTS needs torchvision's pretrained VGG16 (vgg16-397923af.pth) in "
                          f"{torch.hub.get_dir()}/checkpoints: run once with --allow-download on a machine with "
                          "network access, or copy the file there")
    import sys

    if not os.path.isfile(os.path.join(sys.prefix, "weights.pt")):  # DISTS_pytorch 0.1 installs it there
        raise LookupError(f"DISTS needs DISTS_pytorch's learned weights, {sys.prefix}/weights.pt, which its pip "
                          "install puts into the environment's prefix: reinstall it with this Python's pip "
                          "(pip install --force-reinstall DISTS_pytorch), not with --target")
    from DISTS_pytorch import DISTS

    net = DISTS().to(device).eval()

    def metric(a, b):
        return net(_at_least(_nchw(a, device), 64), _at_least(_nchw(b, device), 64),
                   require_grad=False, batch_average=False).reshape(-1).cpu()

    return metric


def _clip(device, allow_download: bool, name: str) -> Metric:
    if importlib.util.find_spec("transformers") is None:
        raise LookupError(f"CLIP needs the package transformers: {EVAL_EXTRA}")
    from transformers import CLIPImageProcessor, CLIPModel

    try:
        model = CLIPModel.from_pretrained(name, local_files_only=not allow_download).to(device).eval()
        processor = CLIPImageProcessor.from_pretrained(name, local_files_only=not allow_download)
    except (OSError, ValueError) as e:  # not in the cache / not a valid id or folder
        raise LookupError(f"CLIP needs the weights of {name!r} (a Hugging Face model id in the local cache, or "
                          "a folder saved with save_pretrained): run once with --allow-download on a machine "
                          f"with network access, or pass --clip-model PATH ({type(e).__name__})") from None

    def embed(x):
        pixels = processor(images=[(i.clamp(0, 1) * 255).round().byte().cpu().numpy() for i in x],
                           return_tensors="pt")["pixel_values"].to(device)
        with torch.no_grad():
            out = model.get_image_features(pixel_values=pixels)
        out = out if isinstance(out, Tensor) else out.pooler_output
        return F.normalize(out.float(), dim=-1)

    def metric(a, b):
        return (100.0 * (embed(a) * embed(b)).sum(-1)).clamp_min(0).cpu()

    return metric


def load_backbones(names=PERCEPTUAL, device="cpu", allow_download: bool = False,
                   clip_model: str = DEFAULT_CLIP) -> tuple[dict[str, Metric], dict[str, str]]:
    """({name: metric} of the backbones that could be loaded, {name: what to install} of the others).

    Without allow_download nothing is fetched: a backbone whose pretrained weights are not already on
    disk is reported missing (never replaced by random weights)."""
    loaders = {"lpips": lambda: _lpips(device, allow_download), "dists": lambda: _dists(device, allow_download),
               "clip": lambda: _clip(device, allow_download, clip_model)}
    found, missing = {}, {}
    for name in names:
        if name not in loaders:
            raise ValueError(f"unknown metric {name!r}: choose among {PERCEPTUAL}")
        try:
            found[name] = loaders[name]()
        except LookupError as e:
            missing[name] = str(e)
    return found, missing


def perceptual_metrics(metrics: dict[str, Metric], output: Tensor, target: Tensor, geometry: Tensor,
                       mask: Tensor) -> dict[str, list[float]]:
    """{'<name>_bg': [...], '<name>_fg': [...]} per image: background vs the target, foreground (the bbox
    of M_geo) vs the geometry image (the transformed source pasted on the target)."""
    out: dict[str, list[float]] = {}
    with torch.no_grad():
        for name, metric in metrics.items():
            bg, fg = [], []
            for i in range(output.shape[0]):
                o, t, g, m = output[i:i + 1], target[i:i + 1], geometry[i:i + 1], mask[i]
                bg.append(float(metric(background(o, m[None]), background(t, m[None]))[0]))
                fg.append(float(metric(foreground(o, m), foreground(g, m))[0]))
            out[f"{name}_bg"], out[f"{name}_fg"] = bg, fg
    return out
