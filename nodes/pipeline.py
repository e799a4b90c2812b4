"""Geometry transfer on a ComfyUI model: the artifacts that flow between the nodes, and the calls
that encode, invert and generate through ComfyUI's own sampler machinery (conditioning, inpainting
concat, latent scaling, CFG, wrappers and hooks all stay ComfyUI's).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

import comfy.model_management
import comfy.samplers
import comfy.utils
import latent_preview
import node_helpers

from ..attention import inversion
from ..attention.kv import Ref
from ..attention.roles import PairLayout, RowPlan, geometry_preserving_rules, texture_aligning_rules
from ..attention.tokens import blend, latent_mask
from ..attention.trajectory import Trajectory
from . import reuse
from .patch import apply_plan, is_inpainting

SCHEDULER = "ddim_uniform"  # DDIM's timesteps; the sampler below is DDIM itself (eta = 0)


@dataclass(frozen=True)
class Scene:
    """HA_SCENE: the images and masks of one geometry transfer (batches: sources S, pairs P)."""

    source: torch.Tensor  # [S, H, W, 3]
    source_mask: torch.Tensor  # [S, H, W], binary
    target: torch.Tensor  # [P, H, W, 3]
    geometry: torch.Tensor  # [P, H, W, 3], the transformed source pasted on the target
    geometry_mask: torch.Tensor  # [P, H, W], binary: M_geo = T(M_src)

    @property
    def layout(self) -> PairLayout:
        return PairLayout(self.source.shape[0], self.geometry.shape[0])


@dataclass(frozen=True)
class Inverted:
    """HA_INVERTED: inverted latents together with the schedule and masks they belong to.

    latents are in the LATENT (VAE) space ComfyUI nodes exchange, rows laid out as PairLayout's
    inversion rows. `blended` is eq. 4's z_T^out, set by HA_LatentBlend.
    """

    scene: Scene
    latents: torch.Tensor  # [S + 2P, C, h, w] at sigmas[0]
    sigmas: torch.Tensor  # the generation schedule, descending, ending at 0
    model_family: str
    inpaint_latents: Optional[torch.Tensor]  # [S + 2P, C, h, w] masked images, for inpainting models
    blended: Optional[torch.Tensor] = None  # [P, C, h, w]
    blend_mask: Optional[torch.Tensor] = None  # [P, 1, h, w]

    @property
    def layout(self) -> PairLayout:
        return self.scene.layout


def model_family(model) -> str:
    inner = model.model
    return f"{type(inner).__name__}/{type(inner.latent_format).__name__}/{'inpaint' if is_inpainting(model) else 'plain'}"


def schedule(model, steps: int) -> torch.Tensor:
    """The descending DDIM schedule (sigmas, last one 0) of `steps` steps for this model."""
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), SCHEDULER, steps).cpu()


def _row_masks(scene: Scene, rows: str) -> torch.Tensor:
    """Region masks in row order: src rows M_src; target, geometry and output rows M_geo."""
    if rows == "inversion":
        return torch.cat([scene.source_mask, scene.geometry_mask, scene.geometry_mask])
    return torch.cat([scene.source_mask, scene.geometry_mask])


def with_inpaint(conditioning, masked_latents: Optional[torch.Tensor], masks: torch.Tensor):
    """Per-row inpainting concat: each row gets its own mask and masked image (ComfyUI keeps per-row
    values whose batch equals the latent batch)."""
    if masked_latents is None:
        return conditioning
    return node_helpers.conditioning_set_values(
        conditioning, {"concat_latent_image": masked_latents, "concat_mask": masks[:, None]}
    )


def masked_image_latents(vae, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """An inpainting model's masked images, encoded: pixels inside the (rounded) mask set to grey, as
    InpaintModelConditioning does. images [B, H, W, C], masks [B, H, W]."""
    keep = (1.0 - masks.round())[..., None]
    return vae.encode((images[..., :3] - 0.5) * keep + 0.5)


def _sampler(loop):
    """A ComfyUI KSAMPLER running `loop(denoise, x, sigmas, callback)`; checks interrupt per model call."""

    def sampler_function(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        s_in = x.new_ones([x.shape[0]])

        def denoise(x_, sigma):
            comfy.model_management.throw_exception_if_processing_interrupted()
            return model(x_, sigma * s_in, **extra_args)

        def step_done(i, total, x_):
            if callback is not None:
                callback({"i": i, "denoised": x_, "x": x_, "sigma": sigmas[i], "sigma_hat": sigmas[i]})

        return loop(denoise, x, sigmas, step_done)

    return comfy.samplers.KSAMPLER(sampler_function)


def run_sampler(model, loop, latents, sigmas, positive, negative, cfg, guider=None):
    """Run `loop` as a ComfyUI sampler from `latents` (no noise added), exactly as SamplerCustom would.
    `guider`: a comfy.samplers.CFGGuider subclass over `model`; default ComfyUI's plain CFGGuider."""
    guider = guider or comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
    samples = guider.sample(torch.zeros_like(latents), latents, _sampler(loop), sigmas.to(latents.device),
                            callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=0)
    return samples.to(comfy.model_management.intermediate_device())


def invert_latents(model, latents, sigmas, positive, iterations: int, average_last: int) -> torch.Tensor:
    """DDIM + ReNoise inversion of `latents` up the descending generation schedule `sigmas` (no CFG)."""
    up = sigmas.flip(0)
    up[0] = max(float(up[0]), 1e-4)  # the clean end: evaluate the model just above sigma 0, like FlipSigmas

    def loop(denoise, x, s, callback):
        return inversion.invert(denoise, x, s, iterations=iterations, average_last=average_last, callback=callback)

    return run_sampler(model, loop, latents, up, positive, positive, 1.0)


def _rows_from(rules: list, first: int, recorded: bool = False) -> list:
    """The rules of rows first.. as a batch of their own: row indices shifted down by `first`. Refs to rows
    before `first` become refs to recorded rows (RowPlan.replay: row len(rules) - first + r) when `recorded`."""
    n = len(rules) - first
    if not recorded and any(r.row < first for refs in rules[first:] if refs is not None for r in refs):
        raise ValueError(f"rows {first}.. refer to a row before {first}: they cannot run as a batch of their own")
    return [None if refs is None else tuple(Ref(r.row - first, r.region_only) if r.row >= first else Ref(n + r.row, True)
                                            for r in refs) for refs in rules[first:]]


def _encode(model, vae, images: torch.Tensor, masks: torch.Tensor):
    """(latents, masked-image latents or None) of images [B, H, W, 3] with region masks [B, H, W]."""
    latents = vae.encode(images[..., :3])
    return latents, masked_image_latents(vae, images, masks) if is_inpainting(model) else None


def invert_sources(model, vae, conditioning, scene: Scene, sigmas, iterations: int, average_last: int):
    """(z_T, masked-image latents or None) of the source rows, inverted as a batch of their own.

    Source rows keep plain self-attention and their own inpainting inputs, so they do not depend on the
    placement or the colour shift: computed alone, their values do not depend on the rest of the batch
    either, and a re-run with the same sources, model, VAE, conditioning and schedule takes them from
    reuse.CACHE (see nodes/reuse.py for what the key covers).
    """
    def compute():
        masks = _row_masks(scene, "inversion")[: scene.layout.sources]
        latents, inpaint = _encode(model, vae, scene.source, masks)
        positive = with_inpaint(conditioning, inpaint, masks)
        return invert_latents(model, latents, sigmas, positive, iterations, average_last), inpaint

    key = reuse.key("source_inversion", lambda k: k.model(model).vae(vae).value(
        (conditioning, scene.source, scene.source_mask, sigmas, iterations, average_last)))
    return reuse.cached(key, compute)


def invert(model, vae, conditioning, scene: Scene, steps: int, iterations: int, average_last: int,
           mode: str) -> Inverted:
    """DDIM + ReNoise inversion of [sources, targets, geometries] with Texture-aligning Attention.

    Two batches: the sources alone (reused across runs, see invert_sources), then [targets, geometries]."""
    layout = scene.layout
    sigmas = schedule(model, steps)
    z_src, inpaint_src = invert_sources(model, vae, conditioning, scene, sigmas, iterations, average_last)

    images = torch.cat([scene.target, scene.geometry])
    masks = _row_masks(scene, "inversion")[layout.sources:]
    latents, inpaint = _encode(model, vae, images, masks)
    positive = with_inpaint(conditioning, inpaint, masks)
    rules = _rows_from(texture_aligning_rules(layout, mode), layout.sources)
    patched = apply_plan(model, RowPlan(len(rules), lambda layer: rules))
    z_t = invert_latents(patched, latents, sigmas, positive, iterations, average_last)
    return Inverted(scene=scene, latents=torch.cat([z_src, z_t]), sigmas=sigmas, model_family=model_family(model),
                    inpaint_latents=None if inpaint is None else torch.cat([inpaint_src, inpaint]))


def blend_latents(inverted: Inverted, feather: float) -> Inverted:
    """Eq. 4 for every pair: z_out = z_geo * m_geo + z_tar * (1 - m_geo)."""
    layout = inverted.layout
    z = inverted.latents
    z_tar = z[layout.tar(0): layout.tar(0) + layout.pairs]
    z_geo = z[layout.geo(0): layout.geo(0) + layout.pairs]
    m = latent_mask(inverted.scene.geometry_mask, z.shape[-2], z.shape[-1], feather).to(z)
    return replace(inverted, blended=blend(z_geo, z_tar, m), blend_mask=m)


def _sample(model, plan: RowPlan, x, sigmas, positive, negative, cfg, inpaint, masks):
    """DDIM of `x` down `sigmas` with `plan`'s attention, each row with its own inpainting inputs."""
    positive = with_inpaint(positive, inpaint, masks)
    negative = with_inpaint(negative, inpaint, masks)

    def loop(denoise, x_, s, callback):
        return inversion.sample(denoise, x_, s, callback=callback)

    return run_sampler(apply_plan(model, plan), loop, x, sigmas, positive, negative, cfg)


def generate_sources(model, positive, negative, inverted: Inverted, cfg: float):
    """(source latents, their Trajectory): the source rows denoised as a batch of their own, recording their
    keys/values inside the source mask at every self-attention call for the output rows' eq. 5.

    Like their inversion, they depend on neither the placement nor the colour shift: a re-run with the same
    inverted sources, model, conditioning, cfg and schedule takes them from reuse.CACHE when they fit its
    budget (SD1.5 at 512 x 512, 25 steps: ~46 MB per step x the mask's fraction of the image in fp16,
    x 2 in fp32 or with cfg != 1; see notes/README-issue-13.md)."""
    sources = inverted.layout.sources
    masks = _row_masks(inverted.scene, "generation")[:sources]
    inpaint = None if inverted.inpaint_latents is None else inverted.inpaint_latents[:sources]
    z = inverted.latents[:sources]

    def compute():
        recording = Trajectory(comfy.model_management.intermediate_device())
        plan = RowPlan(sources, lambda layer: [None] * sources, regions=masks, record=recording)
        return _sample(model, plan, z, inverted.sigmas, positive, negative, cfg, inpaint, masks), recording

    key = reuse.key("source_generation", lambda k: k.model(model).value(
        (positive, negative, float(cfg), inverted.sigmas, z, inpaint, masks)))
    samples, recording = reuse.cached(key, compute)
    return samples.clone(), recording


def generate(model, positive, negative, inverted: Inverted, cfg: float, mode: str):
    """Denoise [sources, blended outputs] with Geometry-preserving Attention; (outputs, sources) latents.

    Two passes: the sources (generate_sources, reused across runs), then the outputs, whose attention takes
    the sources' keys/values from the first pass's recording."""
    layout = inverted.layout
    rows = layout.generation_rows
    sources, recording = generate_sources(model, positive, negative, inverted, cfg)
    masks = _row_masks(inverted.scene, "generation")[layout.sources:]
    inpaint = None if inverted.inpaint_latents is None else inverted.inpaint_latents[layout.sources:rows]
    rules = _rows_from(geometry_preserving_rules(layout, mode), layout.sources, recorded=True)
    plan = RowPlan(layout.pairs, lambda layer: rules, replay=recording.replayer())
    samples = _sample(model, plan, inverted.blended, inverted.sigmas, positive, negative, cfg, inpaint, masks)
    return samples, sources
