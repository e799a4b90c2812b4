"""Geometry transfer on a ComfyUI model: the artifacts that flow between the nodes, and the calls
that encode, invert and generate through ComfyUI's own sampler machinery (conditioning, inpainting
concat, latent scaling, CFG, wrappers and hooks all stay ComfyUI's).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Optional

import logging

import torch

import comfy.model_management
import comfy.samplers
import comfy.utils
import latent_preview
import node_helpers

from ..attention import edit, inversion
from ..attention import window as working_region
from ..attention.kv import Balance
from ..attention.roles import PairLayout, RowPlan, geometry_preserving_rules, texture_aligning_rules
from ..attention.tokens import blend, latent_mask
from ..attention.trajectory import Trajectory
from . import families, reuse
from .families import is_dit, is_inpainting
from .patch import apply_plan, without_step_caches

DEFAULT_SCHEDULER = "default"  # the inversion nodes' scheduler choice meaning SCHEDULER, or FLOW_SCHEDULER on flow models
SCHEDULER = "ddim_uniform"  # DDIM's timesteps; the sampler below is DDIM itself (eta = 0)
FLOW_SCHEDULER = "simple"  # rectified-flow models (Flux, SD3): their own shifted sigmas, evenly in time
CLEAN_SIGMA = 1e-4  # where an inversion starts: the model is evaluated just above sigma 0, like FlipSigmas


@dataclass(frozen=True)
class Scene:
    """HA_SCENE: the images and masks of one geometry transfer (batches: sources S, pairs P).

    With G geometries per target (HA_AddGeometry), S = G or G * P source rows, pair-major (row p * G + g;
    see roles.PairLayout), `geometry` holds every patch composited in order (later on top) and
    `geometry_mask` their union; `placed_masks` keeps each geometry's own M_geo_g.

    Sources (Hs x Ws) may have another size than the target (H x W). The model runs on the working canvas of
    `window` (attention/window.py: the working region, planned from the masks with `working_size` and `context`);
    `working_scene` resamples the scene onto it and HA_DetailPreservingComposite takes the result back.
    """

    source: torch.Tensor  # [S, Hs, Ws, 3]
    source_mask: torch.Tensor  # [S, Hs, Ws], binary
    target: torch.Tensor  # [P, H, W, 3]
    geometry: torch.Tensor  # [P, H, W, 3], the transformed source(s) pasted on the target
    geometry_mask: torch.Tensor  # [P, H, W], binary: M_geo = T(M_src) (the union of all M_geo_g)
    geometries: int = 1
    placed_masks: Optional[torch.Tensor] = None  # [P, G, H, W], binary M_geo_g; None with one geometry
    color_adjusted: bool = False  # HA_ColorShift ran (geometries can no longer be added)
    working_size: int = 0  # 0: the whole target at its own pixels
    context: float = working_region.CONTEXT

    @cached_property
    def window(self) -> working_region.Window:
        """The working region of this scene's geometries (planned once per scene: every change makes a new Scene)."""
        return working_region.plan(self.geometry_mask, self.source_mask, self.working_size, self.context)

    @property
    def layout(self) -> PairLayout:
        return PairLayout(self.source.shape[0], self.geometry.shape[0], self.geometries)

    def parts(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per geometry, in order: (its sources [S/G, H, W, 3], their masks, its visible part of M_geo [P, H, W]).
        Visible: not covered by a later geometry (the later one wins an overlap). One geometry: the scene's own."""
        if self.geometries == 1:
            return [(self.source, self.source_mask, self.geometry_mask)]
        g = self.geometries
        source = self.source.reshape(-1, g, *self.source.shape[1:])
        source_mask = self.source_mask.reshape(-1, g, *self.source_mask.shape[1:])
        parts, later = [], torch.zeros_like(self.geometry_mask)
        for i in reversed(range(g)):
            placed = self.placed_masks[:, i]
            parts.append((source[:, i], source_mask[:, i], placed * (1 - later)))
            later = torch.maximum(later, placed)
        return parts[::-1]


@dataclass(frozen=True)
class Inverted:
    """HA_INVERTED: inverted latents together with the schedule and masks they belong to.

    latents are in the LATENT (VAE) space ComfyUI nodes exchange, rows laid out as PairLayout's
    inversion rows. `blended` is eq. 4's z_T^out, set by HA_LatentBlend.
    """

    scene: Scene
    latents: torch.Tensor  # [S + 2P, C, h, w] at sigmas[0] ([S + 2P, C, 1, h, w] for a video VAE's 5-D latents)
    sigmas: torch.Tensor  # the generation schedule, descending, ending at 0
    model_family: str
    inpaint_latents: Optional[torch.Tensor]  # [S + 2P, C, h, w] masked images, for inpainting models
    blended: Optional[torch.Tensor] = None  # [P, C, h, w] (or [P, C, 1, h, w])
    blend_mask: Optional[torch.Tensor] = None  # [P, 1, h, w] (or [P, 1, 1, h, w]: broadcast over the latents)
    guidance: Optional[float] = None  # a guidance-distilled model's (Flux dev) guidance input of the inversion
    scheduler: Optional[str] = None  # the ComfyUI scheduler that gave `sigmas` (scheduler_name: "default" resolved)

    @property
    def layout(self) -> PairLayout:
        return self.scene.layout


def add_geometry(scene: Scene, source: torch.Tensor, source_mask: torch.Tensor, placement: edit.Placement) -> Scene:
    """The scene with one more geometry: the source's masked patch placed on the target and pasted over
    the scene's geometry image (on top of every earlier geometry where they overlap).

    source [1 or P, Hs, Ws, 3] of any size; source_mask [1 or that batch, Hs, Ws]. The source rows stay one per
    geometry while every geometry has a single source, else become one per geometry and pair (roles.PairLayout).
    Sources of different sizes are padded at the right and bottom (border repeated, mask 0) to the largest: the
    source rows run at one size; each was placed at its own."""
    pairs, g = scene.geometry.shape[0], scene.geometries
    n = max(source.shape[0], source_mask.shape[0])
    source, source_mask = source[..., :3].expand(n, -1, -1, -1), edit.binarize(source_mask).expand(n, -1, -1)
    placed, mask = edit.place_source(source, source_mask, scene.target, placement)  # [P, H, W, 3], [P, H, W]
    geometry = torch.where(mask[..., None] > 0, placed, scene.geometry)
    earlier = scene.placed_masks if scene.placed_masks is not None else scene.geometry_mask[:, None]
    size = tuple(max(a, b) for a, b in zip(scene.source.shape[1:3], source.shape[1:3], strict=True))
    scene = replace(scene, source=working_region.crop(scene.source, [(0, 0)], size),
                    source_mask=working_region.crop(scene.source_mask, [(0, 0)], size, mask=True))
    source, source_mask = working_region.crop(source, [(0, 0)], size), working_region.crop(source_mask, [(0, 0)], size,
                                                                                           mask=True)
    if n == 1 and scene.source.shape[0] == g:  # every geometry keeps one source for all pairs
        sources, source_masks = torch.cat([scene.source, source]), torch.cat([scene.source_mask, source_mask])
    else:
        def per_pair(old, new):  # [S, ...] + [1 or P, ...] -> [P * (G + 1), ...], pair-major
            old = old.reshape(-1, g, *old.shape[1:]).expand(pairs, -1, *old.shape[1:])
            new = new.expand(pairs, *new.shape[1:])[:, None]
            return torch.cat([old, new], 1).flatten(0, 1)

        sources, source_masks = per_pair(scene.source, source), per_pair(scene.source_mask, source_mask)
    return replace(scene, source=sources, source_mask=source_masks, geometry=geometry,
                   geometry_mask=torch.maximum(scene.geometry_mask, mask), geometries=g + 1,
                   placed_masks=torch.cat([earlier, mask[:, None]], 1))


def working_scene(scene: Scene, multiple: int) -> Scene:
    """The scene on its window's working canvas, padded at right and bottom to sides that are multiples of
    `multiple` (the model's pixel step): what the model runs on. The scene's own tensors when the window is the
    whole target at its own size, the sources have that size and no padding is needed."""
    win = scene.window
    size, box = win.size_hw, [win.box[:2]]

    def image(t, origins):
        return working_region.pad(working_region.resample_image(working_region.crop(t, origins, size), win.canvas_hw),
                                  multiple)

    def mask(t, origins):
        cut = working_region.crop(t, origins, size, mask=True)
        return working_region.pad(working_region.resample_mask(cut, win.canvas_hw), multiple, mask=True)

    placed = scene.placed_masks
    if placed is not None:
        placed = mask(placed.flatten(0, 1), box).unflatten(0, placed.shape[:2])
    return replace(scene, source=image(scene.source, win.source_origins), source_mask=mask(scene.source_mask,
                   win.source_origins), target=image(scene.target, box), geometry=image(scene.geometry, box),
                   geometry_mask=mask(scene.geometry_mask, box), placed_masks=placed, working_size=0)


def model_family(model) -> str:
    inner = model.model
    return f"{type(inner).__name__}/{type(inner.latent_format).__name__}/{'inpaint' if is_inpainting(model) else 'plain'}"


def is_flow(model) -> bool:
    """A rectified-flow model (ComfyUI's CONST sampling: x_s = (1 - s) x0 + s noise, s in [0, 1])."""
    import comfy.model_sampling

    return isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST)


def scheduler_name(model, scheduler: str = DEFAULT_SCHEDULER) -> str:
    """The ComfyUI scheduler `scheduler` stands for on this model: DEFAULT_SCHEDULER is DDIM's timesteps
    (ddim_uniform), or on a flow model its own sigmas evenly in time (simple)."""
    if scheduler == DEFAULT_SCHEDULER:
        return FLOW_SCHEDULER if is_flow(model) else SCHEDULER
    if scheduler not in comfy.samplers.SCHEDULER_NAMES:
        raise ValueError(f"scheduler {scheduler!r}: choose {DEFAULT_SCHEDULER!r} or one of ComfyUI's schedulers "
                         f"{comfy.samplers.SCHEDULER_NAMES}")
    return scheduler


def schedule(model, steps: int, scheduler: str = DEFAULT_SCHEDULER) -> torch.Tensor:
    """The descending schedule (sigmas, last one 0) of `steps` steps for this model from the ComfyUI scheduler
    `scheduler` names (scheduler_name; the default: DDIM's timesteps, or for a flow model its own (shifted)
    sigmas evenly in time, from 1 (pure noise) to 0). The same sigmas serve the inversion (flipped, from
    CLEAN_SIGMA up) and the generation; a schedule that cannot serve both is refused with the fix."""
    name = scheduler_name(model, scheduler)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), name, steps).cpu()
    # the default keeps earlier versions' schedules as they were, ddim_uniform's 999 steps for steps = 1000 too
    problem = _unfit(sigmas, None if scheduler == DEFAULT_SCHEDULER else steps)
    if problem:
        raise ValueError(f"the {name} scheduler with steps = {steps} {problem}, so it does not fit an inversion: "
                         "choose another scheduler (sgm_uniform or simple for few-step models; default as in the "
                         "paper) or another number of steps")
    return sigmas


def _unfit(sigmas: torch.Tensor, steps: Optional[int]) -> Optional[str]:
    """What keeps `sigmas` from being an inversion's schedule, or None: it must fall strictly to exactly 0, its
    lowest noise level above CLEAN_SIGMA (where the flipped schedule starts), with no fewer steps than `steps`
    (beta merges repeated timesteps; ddim_uniform's stride may give more, which is fine); None: any count."""
    values = [float(v) for v in sigmas.reshape(-1)]
    if sigmas.ndim != 1 or len(values) < 2:
        return f"gives no step (sigma {sigma_path(values)})"
    if not all(math.isfinite(v) for v in values):
        return f"gives sigmas that are not numbers (sigma {sigma_path(values)})"
    if any(b >= a for a, b in zip(values, values[1:], strict=False)):
        return f"gives sigmas that do not fall step by step (sigma {sigma_path(values)})"
    if values[-1] != 0:
        return f"ends at sigma {values[-1]:.4g}, not at the clean image (0)"
    if steps is not None and len(values) - 1 < steps:
        return f"gives only {len(values) - 1} steps (sigma {sigma_path(values)})"
    if values[-2] <= CLEAN_SIGMA:
        return f"has its lowest noise level {values[-2]:.3g} at or below {CLEAN_SIGMA}, where an inversion starts"
    return None


def sigma_path(values) -> str:
    """A schedule for people: "14.61 > 4.086 > ... > 0" (every value up to 11 of them)."""
    values = [float(v) for v in values]
    shown = values if len(values) <= 11 else [*values[:3], None, *values[-3:]]
    return " > ".join("..." if v is None else f"{v:.4g}" for v in shown)


def at_pure_noise(model, sigma: float) -> bool:
    """Whether `sigma` is the model's pure-noise end (sigma_max), as ComfyUI's samplers decide it."""
    sigma_max = float(model.get_model_object("model_sampling").sigma_max)
    return math.isclose(sigma, sigma_max, rel_tol=1e-5) or sigma > sigma_max


def guidance_of(model, conditioning) -> Optional[float]:
    """The guidance input a guidance-distilled model (Flux dev / Fill) gets from `conditioning` (FluxGuidance
    sets it; ComfyUI's default is 3.5), or None for models without one."""
    if not model.model.model_config.unet_config.get("guidance_embed", False):
        return None
    values = {extra.get("guidance", 3.5) for _, extra in conditioning}
    values = {None if v is None else float(v) for v in values}
    if len(values) > 1:
        raise ValueError(f"the conditioning carries several Flux guidance values {sorted(values, key=str)}: give it one "
                         "(a single FluxGuidance node)")
    return values.pop() if values else None


def same_guidance(model, conditioning, name: str, inverted_at: Optional[float], strict: bool = True):
    """`conditioning` at the inversion's guidance: inverting and sampling a guidance-distilled model at different
    guidance leaves the inverted noise off the sampler's trajectory. With `strict`, an explicit different value
    is an error (the negative prompt's is simply set)."""
    if inverted_at is None:
        return conditioning
    for _, extra in conditioning:
        if strict and extra.get("guidance") is not None and float(extra["guidance"]) != inverted_at:
            raise ValueError(f"the {name} conditioning has Flux guidance {float(extra['guidance'])} but the images "
                             f"were inverted at {inverted_at}: invert and sample at the same guidance (connect the "
                             "same FluxGuidance value to both nodes)")
    return node_helpers.conditioning_set_values(conditioning, {"guidance": inverted_at})


def _row_masks(scene: Scene, rows: str) -> torch.Tensor:
    """Region masks in row order: src rows M_src; target, geometry and output rows M_geo."""
    if rows == "inversion":
        return torch.cat([scene.source_mask, scene.geometry_mask, scene.geometry_mask])
    return torch.cat([scene.source_mask, scene.geometry_mask])


def with_inpaint(conditioning, masked_latents: Optional[torch.Tensor], masks: torch.Tensor):
    """Per-row inpainting concat: each row gets its own mask and masked image (ComfyUI keeps per-row
    values whose batch equals the latent batch). masks [B, H, W] in pixels.

    The mask channel is handed over at the latent's size, binary, by tokens.latent_mask's rule: ComfyUI's
    concat_cond (model_base.BaseModel, 0.3.64 and 0.33) resizes a concat_mask only when its size differs
    from the latent's and then rounds it, both no-ops here, so the model sees the very cells that the blend
    and the attention tokens use."""
    if masked_latents is None:
        return conditioning
    h, w = masked_latents.shape[-2:]
    return node_helpers.conditioning_set_values(
        conditioning, {"concat_latent_image": masked_latents, "concat_mask": latent_mask(masks, h, w)}
    )


def encode(vae, images: torch.Tensor) -> torch.Tensor:
    """Latents of images [B, H, W, 3], one per image: [B, C, h, w], or [B, C, 1, h, w] from a video VAE (Qwen-Image's
    Wan VAE), which would take a batch of images as the frames of one video."""
    if getattr(vae, "latent_dim", 2) == 3:
        return torch.cat([vae.encode(image[None]) for image in images[..., :3]])
    return vae.encode(images[..., :3])


def masked_image_latents(vae, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """An inpainting model's masked images, encoded: pixels inside the (rounded) mask set to grey, as
    InpaintModelConditioning does. images [B, H, W, C], masks [B, H, W]."""
    keep = (1.0 - masks.round())[..., None]
    return encode(vae, (images[..., :3] - 0.5) * keep + 0.5)


class _FromLatent(comfy.samplers.KSAMPLER):
    """A KSAMPLER that starts from the latent exactly as given and returns its result as is: ComfyUI's noise
    scaling with zero noise is the identity for EPS / V models, but a flow model's scales the latent by
    (1 - sigma_0) (0 at sigma 1) and its inverse divides by (1 - sigma_last) (0 when inverting up to 1)."""

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        extra_args["denoise_mask"] = denoise_mask
        model_k = comfy.samplers.KSamplerX0Inpaint(model_wrap, sigmas)
        model_k.latent_image, model_k.noise = latent_image, noise
        total = len(sigmas) - 1

        def k_callback(x):
            if callback is not None:
                callback(x["i"], x["denoised"], x["x"], total)

        return self.sampler_function(model_k, latent_image, sigmas, extra_args=extra_args, callback=k_callback,
                                     disable=disable_pbar)


def _sampler(loop):
    """A ComfyUI sampler running `loop(denoise, x, sigmas, callback)`; checks interrupt per model call."""

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

    return _FromLatent(sampler_function)


def run_sampler(model, loop, latents, sigmas, positive, negative, cfg, guider=None):
    """Run `loop` as a ComfyUI sampler from `latents` (no noise added), exactly as SamplerCustom would.
    `guider(model)` makes the comfy.samplers.CFGGuider (or subclass) to sample with; default ComfyUI's plain CFGGuider.

    Every pass of the pack needs every model evaluation it asks for (ReNoise evaluates several times at one step, a
    sources' generation pass is replayed evaluation by evaluation, the appearance guidance evaluates twice per step): the
    model's step caches are suspended for the pass (patch.without_step_caches; `model` keeps them)."""
    guider = (guider or comfy.samplers.CFGGuider)(without_step_caches(model))
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
    samples = guider.sample(torch.zeros_like(latents), latents, _sampler(loop), sigmas.to(latents.device),
                            callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=0)
    return samples.to(comfy.model_management.intermediate_device())


def invert_latents(model, latents, sigmas, positive, iterations: int, average_last: int) -> torch.Tensor:
    """DDIM + ReNoise inversion of `latents` up the descending generation schedule `sigmas` (no CFG). On a flow
    model the same step is the Euler step of the flow ODE (see attention.inversion)."""
    up = sigmas.flip(0)
    up[0] = max(float(up[0]), CLEAN_SIGMA)  # the clean end: evaluate the model just above sigma 0, like FlipSigmas

    def loop(denoise, x, s, callback):
        return inversion.invert(denoise, x, s, iterations=iterations, average_last=average_last, callback=callback)

    return run_sampler(model, loop, latents, up, positive, positive, 1.0)


def _log_balance(plan: RowPlan, stage: str, report: Optional[list]) -> None:
    lines = plan.balance_report()
    if lines:
        logging.info("Harmonizing Attention %s balance per layer (keys, weight, share at equal logits):\n  %s",
                     stage, "\n  ".join(lines))
    if report is not None:
        report.extend(lines)


def _rows_from(rules: list, first: int, recorded: bool = False) -> list:
    """The rules of rows first.. as a batch of their own: row indices shifted down by `first`. Refs to rows
    before `first` become refs to recorded rows (RowPlan.replay: row len(rules) - first + r) when `recorded`."""
    n = len(rules) - first
    if not recorded and any(r.row < first for refs in rules[first:] if refs is not None for r in refs):
        raise ValueError(f"rows {first}.. refer to a row before {first}: they cannot run as a batch of their own")
    return [None if refs is None else tuple(dataclasses.replace(r, row=r.row - first) if r.row >= first
                                            else dataclasses.replace(r, row=n + r.row, region_only=True)
                                            for r in refs) for refs in rules[first:]]


def _encode(model, vae, images: torch.Tensor, masks: torch.Tensor):
    """(latents, masked-image latents or None) of images [B, H, W, 3] with region masks [B, H, W]."""
    latents = encode(vae, images)
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
           mode: str, dit_window: tuple[float, float] = (0.0, 1.0), *, balance: Optional[Balance] = None,
           report: Optional[list] = None, scheduler: str = DEFAULT_SCHEDULER) -> Inverted:
    """DDIM + ReNoise inversion of [sources, targets, geometries] with Texture-aligning Attention, over the
    `scheduler`'s schedule (see schedule). `balance` weighs the target's keys (kv.Balance); `report` receives
    the weights each layer got.

    Two batches: the sources alone (reused across runs, see invert_sources), then [targets, geometries]."""
    layout = scene.layout
    sigmas = schedule(model, steps, scheduler)
    z_src, inpaint_src = invert_sources(model, vae, conditioning, scene, sigmas, iterations, average_last)

    images = torch.cat([scene.target, scene.geometry])
    masks = _row_masks(scene, "inversion")[layout.sources:]
    latents, inpaint = _encode(model, vae, images, masks)
    positive = with_inpaint(conditioning, inpaint, masks)
    rules = _rows_from(texture_aligning_rules(layout, mode, balance), layout.sources)
    plan = RowPlan(len(rules), lambda layer: rules, report_balance=balance is not None)
    z_t = invert_latents(apply_plan(model, plan, dit_window), latents, sigmas, positive, iterations, average_last)
    _log_balance(plan, "texture-aligning", report)
    return Inverted(scene=scene, latents=torch.cat([z_src, z_t]), sigmas=sigmas, model_family=model_family(model),
                    inpaint_latents=None if inpaint is None else torch.cat([inpaint_src, inpaint]),
                    guidance=guidance_of(model, conditioning), scheduler=scheduler_name(model, scheduler))


def blend_latents(inverted: Inverted, feather: float) -> Inverted:
    """Eq. 4 for every pair: z_out = z_geo * m_geo + z_tar * (1 - m_geo)."""
    layout = inverted.layout
    z = inverted.latents
    z_tar = z[layout.tar(0): layout.tar(0) + layout.pairs]
    z_geo = z[layout.geo(0): layout.geo(0) + layout.pairs]
    m = latent_mask(inverted.scene.geometry_mask, z.shape[-2], z.shape[-1], feather).to(z)
    m = m.view(m.shape[0], 1, *[1] * (z.ndim - 4), *m.shape[-2:])  # over 5-D latents' frame too
    return replace(inverted, blended=blend(z_geo, z_tar, m), blend_mask=m)


def _sample(model, plan: RowPlan, x, sigmas, positive, negative, cfg, inpaint, masks,
            dit_window: tuple[float, float] = (0.0, 1.0)):
    """DDIM of `x` down `sigmas` with `plan`'s attention, each row with its own inpainting inputs."""
    positive = with_inpaint(positive, inpaint, masks)
    negative = with_inpaint(negative, inpaint, masks)

    def loop(denoise, x_, s, callback):
        return inversion.sample(denoise, x_, s, callback=callback)

    return run_sampler(apply_plan(model, plan, dit_window), loop, x, sigmas, positive, negative, cfg)


def dit_recording_bytes(model, inverted: Inverted, cfg: float, dit_window: tuple[float, float]) -> int:
    """What a DiT's source recording holds (generate_sources), from the shapes: keys and values of every source
    row's region tokens (the longest row's count), at every patched block of every model call (steps x cond/uncond
    chunks), at the width and dtype of the joint attention. Flux.1 at 1024 x 1024 (4096 image tokens of 3072
    channels, 57 blocks) in bf16: 2.9 GB per step and source x the mask's fraction of the image."""
    sources = inverted.layout.sources
    h, w = families.token_grid(inverted.latents.shape[-2:], families.patch_size(model))
    masks = _row_masks(inverted.scene, "generation")[:sources]
    longest = max(RowPlan(sources, lambda layer: [None] * sources, regions=masks).record_index(h, w, 1, "cpu")[1])
    blocks = families.dit_blocks(model)
    start, end = dit_window
    patched = sum(start <= i / len(blocks) < end for i in range(len(blocks)))
    calls = (len(inverted.sigmas) - 1) * (1 if cfg == 1.0 else 2)
    inner = model.model
    dtype = getattr(inner, "manual_cast_dtype", None) or inner.get_dtype() or torch.float32  # the attention's
    return 2 * patched * calls * sources * longest * families.token_width(model) * dtype.itemsize


def generate_sources(model, positive, negative, inverted: Inverted, cfg: float,
                     dit_window: tuple[float, float] = (0.0, 1.0)):
    """(source latents, their Trajectory): the source rows denoised as a batch of their own, recording their
    keys/values inside the source mask at every self-attention call (a DiT's: every joint attention of the
    patched blocks, its image tokens) for the output rows' eq. 5.

    Like their inversion, they depend on neither the placement nor the colour shift: a re-run with the same
    inverted sources, model, conditioning, cfg and schedule takes them from reuse.CACHE when they fit its
    budget (SD1.5 at 512 x 512, 25 steps: ~46 MB per step x the mask's fraction of the image in fp16,
    x 2 in fp32 or with cfg != 1; a DiT: dit_recording_bytes; see docs/method.md, "Re-runs reuse what did not
    change")."""
    sources = inverted.layout.sources
    masks = _row_masks(inverted.scene, "generation")[:sources]
    inpaint = None if inverted.inpaint_latents is None else inverted.inpaint_latents[:sources]
    z = inverted.latents[:sources]

    def compute():
        recording = Trajectory(comfy.model_management.intermediate_device())
        plan = RowPlan(sources, lambda layer: [None] * sources, regions=masks, record=recording)
        return _sample(model, plan, z, inverted.sigmas, positive, negative, cfg, inpaint, masks, dit_window), recording

    key = reuse.key("source_generation", lambda k: k.model(model).value(
        (positive, negative, float(cfg), inverted.sigmas, z, inpaint, masks, dit_window)))
    samples, recording = reuse.cached(key, compute)
    return samples.clone(), recording


def generate(model, positive, negative, inverted: Inverted, cfg: float, mode: str,
             dit_window: tuple[float, float] = (0.0, 1.0), *, balance: Optional[Balance] = None,
             report: Optional[list] = None, notes: Optional[list] = None):
    """Denoise [sources, blended outputs] with Geometry-preserving Attention; (outputs, sources) latents.
    `balance` weighs each source's keys (kv.Balance); `report` receives the weights each layer got; `notes` what the
    node should tell the user (a recording above the reuse cache's budget).

    Two passes: the sources (generate_sources, reused across runs), then the outputs, whose attention takes the
    sources' keys/values from the first pass's recording. On a diffusion transformer whose recording
    (dit_recording_bytes) would exceed the reuse cache's budget, the rows run as one batch instead (the same
    attention, nothing recorded, nothing reused: a re-run recomputes the sources)."""
    layout = inverted.layout
    positive = same_guidance(model, positive, "positive", inverted.guidance)
    negative = same_guidance(model, negative, "negative", inverted.guidance, strict=False)
    rules = geometry_preserving_rules(layout, mode, balance)
    recording_bytes = dit_recording_bytes(model, inverted, cfg, dit_window) if is_dit(model) else 0
    if recording_bytes > reuse.CACHE.budget:
        note = (f"the sources' generation recording ({recording_bytes / 2 ** 20:.0f} MiB) exceeds the reuse cache "
                f"(HARMONIZING_ATTENTION_CACHE_MB={reuse.CACHE.budget / 2 ** 20:.0f}): the generation runs sources and "
                "outputs as one batch, and a re-run after moving the geometry recomputes the sources' generation (their "
                "inversion is still reused). Raise HARMONIZING_ATTENTION_CACHE_MB to keep it.")
        logging.info("Harmonizing Attention: %s", note)
        if notes is not None and reuse.CACHE.budget > 0:  # 0: the user switched reuse off
            notes.append(note)
        rows = layout.generation_rows
        x = torch.cat([inverted.latents[: layout.sources], inverted.blended])
        masks = _row_masks(inverted.scene, "generation")
        inpaint = None if inverted.inpaint_latents is None else inverted.inpaint_latents[:rows]
        plan = RowPlan(rows, lambda layer: rules, regions=masks, report_balance=balance is not None)
        samples = _sample(model, plan, x, inverted.sigmas, positive, negative, cfg, inpaint, masks, dit_window)
        _log_balance(plan, "geometry-preserving", report)
        return samples[layout.sources:], samples[: layout.sources]
    sources, recording = generate_sources(model, positive, negative, inverted, cfg, dit_window)
    masks = _row_masks(inverted.scene, "generation")[layout.sources:]
    inpaint = None if inverted.inpaint_latents is None else inverted.inpaint_latents[layout.sources:layout.generation_rows]
    rules = _rows_from(rules, layout.sources, recorded=True)
    plan = RowPlan(layout.pairs, lambda layer: rules, replay=recording.replayer(), report_balance=balance is not None)
    samples = _sample(model, plan, inverted.blended, inverted.sigmas, positive, negative, cfg, inpaint, masks,
                      dit_window)
    _log_balance(plan, "geometry-preserving", report)
    return samples, sources
