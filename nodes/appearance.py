"""Cross-Image Attention (zero-shot appearance transfer) on a ComfyUI model, built on the pack's core:
the same inversion (DDIM + ReNoise), attention patch (apply_plan with a RowPlan) and sampler driver
(pipeline.run_sampler) as the geometry transfer, plus a CFGGuider subclass for the appearance guidance.

Node IDs are workflow identity: never rename one.
"""
from __future__ import annotations

from dataclasses import dataclass

import comfy.samplers
import torch
from comfy_api.latest import io

from ..attention import inversion
from ..attention.appearance import (
    PAPER_ADAIN,
    PAPER_WINDOWS,
    AppearanceLayout,
    CrossImageRules,
    CrossImageSchedule,
    appearance_guidance,
    check_window,
    masked_adain,
)
from ..attention.roles import RowPlan
from ..attention.tokens import latent_mask
from . import families, pipeline, renoise, validate
from .geometry import _ui_text, check_dit_window, dit_window_inputs, logged
from .naming import APPEARANCE_CATEGORY as CATEGORY
from .naming import APPEARANCE_WORDS, search_aliases
from .patch import apply_plan, model_notes, schedule_position

# On a diffusion transformer, cross-image attention acts in the later half of the blocks, the counterpart
# of the UNet decoder layers it uses; those blocks follow the full_res step window.
DIT_WINDOW = (0.5, 1.0)
AppearanceInvertedType = io.Custom("HA_APPEARANCE_INVERTED")


@dataclass(frozen=True)
class AppearanceInverted:
    """HA_APPEARANCE_INVERTED: the starting latents of the generation rows with their schedule.

    latents are in the LATENT (VAE) space, rows laid out as AppearanceLayout's [app, struct, out]
    (the output rows start from the structure's inversion). For inpainting models every row carries
    its own concat: appearance and structure rows their own image, fully kept (mask 0), which helps
    them reconstruct; output rows a grey image, fully masked (mask 1), so nothing pins the output to
    the structure's pixels. The output rows are then inverted under that concat of their own.
    """

    latents: torch.Tensor  # [3P, C, h, w] at sigmas[0]
    sigmas: torch.Tensor  # the generation schedule, descending, ending at 0
    model_family: str
    image_size: tuple[int, int]  # (H, W) of the structure and appearance images
    inpaint_latents: torch.Tensor | None = None  # [3P, C, h, w]
    inpaint_masks: torch.Tensor | None = None  # [3P, H, W]
    guidance: float | None = None  # a guidance-distilled model's (Flux dev) guidance input of the inversion
    scheduler: str | None = None  # the ComfyUI scheduler that gave `sigmas` (pipeline.scheduler_name)

    @property
    def layout(self) -> AppearanceLayout:
        return AppearanceLayout(self.latents.shape[0] // 3)


def _pairs(structure: torch.Tensor, appearance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(structure.shape[0], appearance.shape[0])
    return structure[..., :3].expand(n, -1, -1, -1), appearance[..., :3].expand(n, -1, -1, -1)


def schedule_steps(steps: int, denoise: float) -> int:
    """The steps of the whole schedule whose last `steps` a denoise below 1 runs (KSampler's denoise)."""
    return max(steps, int(steps / denoise))


def generation_schedule(model, steps: int, denoise: float,
                        scheduler: str = pipeline.DEFAULT_SCHEDULER) -> torch.Tensor:
    """The last `steps` steps of the `scheduler`'s schedule of int(steps / denoise) steps (KSampler's denoise)."""
    return pipeline.schedule(model, schedule_steps(steps, denoise), scheduler)[-(steps + 1):]


def invert(model, vae, conditioning, structure: torch.Tensor, appearance: torch.Tensor, steps: int,
           denoise: float, iterations: int, average_last: int,
           scheduler: str = pipeline.DEFAULT_SCHEDULER) -> AppearanceInverted:
    """DDIM + ReNoise inversion of [appearance, structure] with plain self-attention (the paper inverts
    each image on its own) over the `scheduler`'s schedule; the output rows start from the structure's latents."""
    sigmas = generation_schedule(model, steps, denoise, scheduler)  # an unfit schedule is refused before any work
    structure, appearance = _pairs(structure, appearance)
    layout = AppearanceLayout(structure.shape[0])
    p = layout.pairs
    images = torch.cat([appearance, structure])
    latents = pipeline.encode(vae, images)
    inpaint_latents = inpaint_masks = None
    positive = conditioning
    if families.is_inpainting(model):
        # the output rows are inverted too, under their own (fully masked) concat
        images = torch.cat([images, structure])
        latents = torch.cat([latents, latents[p:]])
        inpaint_masks = torch.cat([torch.zeros(2 * p, *images.shape[1:3]), torch.ones(p, *images.shape[1:3])])
        inpaint_latents = pipeline.masked_image_latents(vae, images, inpaint_masks)
        positive = pipeline.with_inpaint(conditioning, inpaint_latents, inpaint_masks)

    z_t = pipeline.invert_latents(model, latents, sigmas, positive, iterations, average_last)
    if inpaint_latents is None:
        z_t = torch.cat([z_t, z_t[p:]])
    return AppearanceInverted(latents=z_t, sigmas=sigmas, model_family=pipeline.model_family(model),
                              image_size=tuple(structure.shape[1:3]), inpaint_latents=inpaint_latents,
                              inpaint_masks=inpaint_masks, guidance=pipeline.guidance_of(model, conditioning),
                              scheduler=pipeline.scheduler_name(model, scheduler))


class CrossImageGuider(comfy.samplers.CFGGuider):
    """Appearance guidance (eq. 4) as a ComfyUI guider: eps = eps_self + alpha * (eps_cross - eps_self)
    on the output rows, eps_cross from the patched model and eps_self from the same model with every
    cross-image rule switched off (exactly the unpatched attention). Each pass is ComfyUI's own CFG
    prediction, so text CFG (cfg != 1) composes with it. Steps where no layer uses cross-image attention,
    and alpha 0 or 1, need one pass only."""

    def __init__(self, model_patcher, rules: CrossImageRules):
        super().__init__(model_patcher)
        self.rules = rules

    def predict_noise(self, x, timestep, model_options=None, seed=None):
        model_options = {} if model_options is None else model_options
        schedule, layout = self.rules.schedule, self.rules.layout
        step = schedule_position({"sigmas": timestep,
                                  "sample_sigmas": model_options.get("transformer_options", {}).get("sample_sigmas")})
        i = schedule.index(step) if step is not None else None
        alpha = schedule.guidance(i) if i is not None else 1.0
        if i is None or not schedule.active(i) or alpha == 1:
            return super().predict_noise(x, timestep, model_options, seed)
        with self.rules.plain():
            plain = super().predict_noise(x, timestep, model_options, seed)
        if alpha == 0:
            return plain
        cross = super().predict_noise(x, timestep, model_options, seed)
        out = slice(layout.out(0), layout.out(0) + layout.pairs)
        cross[out] = appearance_guidance(plain[out], cross[out], alpha)
        return cross


def _latent_masks(mask: torch.Tensor | None, pairs: int, h: int, w: int) -> torch.Tensor | None:
    if mask is None:
        return None
    m = latent_mask(mask.float(), h, w)[:, 0] > 0.5  # [B, h, w], the cells of tokens.py's mask rule
    return m.expand(pairs, -1, -1) if m.shape[0] != pairs else m


def generate(model, positive, negative, inverted: AppearanceInverted, cfg: float, schedule: CrossImageSchedule,
             contrast: float, contrast_clip: bool, output_mask: torch.Tensor | None = None,
             appearance_mask: torch.Tensor | None = None, dit_window: tuple[float, float] = DIT_WINDOW):
    """Denoise [app, struct, out] with cross-image attention, appearance guidance and AdaIN.
    Returns latents (outputs, appearance reconstructions, structure reconstructions)."""
    layout = inverted.layout
    p = layout.pairs
    positive = pipeline.same_guidance(model, positive, "positive", inverted.guidance)
    negative = pipeline.same_guidance(model, negative, "negative", inverted.guidance, strict=False)
    positive = pipeline.with_inpaint(positive, inverted.inpaint_latents, inverted.inpaint_masks)
    negative = pipeline.with_inpaint(negative, inverted.inpaint_latents, inverted.inpaint_masks)
    rules = CrossImageRules(layout, schedule)
    patched = apply_plan(model, RowPlan(layout.rows, rules, needs_step=True, contrast=contrast,
                                        contrast_clip=contrast_clip), dit_window)
    h, w = inverted.latents.shape[-2:]
    out_masks = _latent_masks(output_mask, p, h, w)
    app_masks = _latent_masks(appearance_mask, p, h, w)
    app, out = slice(0, p), slice(2 * p, 3 * p)

    def loop(denoise, x, sigmas, callback):
        total = len(sigmas) - 1
        for i in range(total):
            x = inversion.sample(denoise, x, sigmas[i:i + 2])
            if schedule.adain_after(i):
                x = x.clone()
                x[out] = masked_adain(x[out], x[app], out_masks, app_masks)
            callback(i, total, x)
        return x

    samples = pipeline.run_sampler(patched, loop, inverted.latents, inverted.sigmas, positive, negative, cfg,
                                   guider=lambda m: CrossImageGuider(m, rules))
    return samples[out], samples[app], samples[p:2 * p]


# ---------------------------------------------------------------- nodes

# why the sampler suspends step caches (patch.model_notes)
GUIDANCE_STEP_CACHES = ("the appearance guidance evaluates the model twice per step on the same latent, and a step "
                        "cache would return the first evaluation for the second.")


class AppearanceInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HA_AppearanceInversion",
            display_name="Appearance/Texture Transfer · Inversion",
            category=CATEGORY,
            description="Turns the structure and appearance images into noise for the appearance transfer's sampler. "
                        "DDIM + ReNoise (deterministic; "
                        "the paper uses edit-friendly DDPM inversion, whose per-step noise maps an accurate "
                        "inversion does not need). The sampler's output starts from the structure's latent.",
            **search_aliases(APPEARANCE_WORDS, "appearance inversion", "inversion", "renoise"),
            inputs=[
                io.Model.Input("model", tooltip=f"{families.SUPPORTED}. The paper uses SD1.5."),
                io.Vae.Input("vae"),
                io.Conditioning.Input("conditioning",
                                      tooltip="The inversion prompt, straight from CLIPTextEncode (paper: "
                                              "'A photo of a <domain>', e.g. 'A photo of an animal')."),
                io.Image.Input("structure", tooltip="The image whose shape and layout the output keeps."),
                io.Image.Input("appearance", tooltip="The image whose appearance (colours, textures) is transferred. "
                                                     "Same size as structure; the paper uses 512x512."),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="DDIM steps, reused by the sampler (paper: 100; 50 halves the cost at "
                                     "DDIM's usual quality). The sampler's windows are fractions of them."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="Fraction of the noise schedule inverted and regenerated (as KSampler's "
                                       "denoise). 1: from pure noise (paper's text). The official code starts 32 "
                                       "of 100 steps in: 0.68."),
                *renoise.inputs(""),
                renoise.scheduler_input(),
            ],
            outputs=[AppearanceInvertedType.Output(display_name="inverted",
                                                   tooltip="Inverted latents of both images with their schedule.")],
        )

    @classmethod
    def validate_inputs(cls, renoise_iterations=None, renoise_average=None):
        return renoise.validate_inputs(renoise_iterations, renoise_average)

    @classmethod
    def execute(cls, model, vae, conditioning, structure, appearance, steps, denoise, renoise_iterations,
                renoise_average, scheduler=pipeline.DEFAULT_SCHEDULER) -> io.NodeOutput:
        validate.unet(model)
        validate.conditioning_width(model, conditioning, "the conditioning")
        validate.inpaint_conditioning_free(conditioning, "HA_AppearanceInversion")
        validate.image("structure", structure)
        validate.image("appearance", appearance)
        validate.same_size("appearance", appearance, "structure", structure,
                           "both are denoised in one batch: scale the appearance image to the structure's size "
                           "(ImageScale)")
        validate.batches("structure", structure.shape[0], "appearance", appearance.shape[0])
        validate.vae(model, vae)
        validate.latent_size("structure", structure, model)
        renoise.check(renoise_iterations, renoise_average)
        notes = logged(model_notes(model, "HA_AppearanceInversion", renoise.STEP_CACHES))
        inverted = invert(model, vae, conditioning, structure, appearance, steps, denoise, renoise_iterations,
                          renoise_average, scheduler)
        total = schedule_steps(steps, denoise)
        ran, *warned = renoise.schedule_notes(model, scheduler, inverted.scheduler, steps, inverted.sigmas,
                                              renoise_iterations, total=total if total != steps else None)
        return io.NodeOutput(inverted, ui=_ui_text([ran], "", [], warnings=[*warned, *notes]))


def _fraction(name: str, default: float, tooltip: str) -> io.Float.Input:
    return io.Float.Input(name, default=default, min=0.0, max=1.0, step=0.01, tooltip=tooltip)


class CrossImageSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        (full_start, full_end), (half_start, half_end) = PAPER_WINDOWS[1], PAPER_WINDOWS[2]
        return io.Schema(
            node_id="HA_CrossImageSampler",
            display_name="Appearance/Texture Transfer · Sampler",
            category=CATEGORY,
            description="Generates the structure image with the colours and textures of the appearance image "
                        "(Cross-Image Attention). DDIM over the inversion's schedule, denoising [appearance, "
                        "structure, output] together. "
                        "In the decoder's self-attention at the two finest resolutions the output's queries "
                        "attend to the appearance image's keys and values (eq. 2), with contrast (eq. 3), "
                        "appearance guidance (eq. 4), AdaIN to the appearance latent (eq. 5) and periodic "
                        "structure injection (appendix A). Fractions are of the schedule's steps.",
            **search_aliases(APPEARANCE_WORDS, "cross-image sampler", "sampler"),
            inputs=[
                io.Model.Input("model", tooltip="The model the inversion used."),
                io.Conditioning.Input("positive", tooltip="Paper: the inversion prompt ('A photo of a <domain>')."),
                io.Conditioning.Input("negative", tooltip="Used only when cfg != 1."),
                AppearanceInvertedType.Input("inverted", tooltip="From HA_AppearanceInversion."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Text classifier-free guidance. 1 (paper): the negative prompt is not "
                                       "evaluated."),
                io.Float.Input("contrast", default=1.67, min=0.0, max=10.0, step=0.01,
                               tooltip="beta of eq. 3, sharpening the cross-image attention maps (paper: 1.67; "
                                       "1: off)."),
                io.Boolean.Input("contrast_clip", default=False,
                                 tooltip="Clamp the contrasted attention weights to [0, 1], as the official code "
                                         "does (eq. 3 itself has no clamp)."),
                io.Float.Input("appearance_guidance", default=3.5, min=0.0, max=20.0, step=0.1,
                               tooltip="alpha of eq. 4: eps_self + alpha (eps_cross - eps_self) (paper: 3.5). "
                                       "1: cross-image attention alone; 0: the plain model."),
                io.Boolean.Input("guidance_decay", default=False,
                                 tooltip="Decay alpha linearly to max(alpha / 2, 1) by the last step, as the "
                                         "official code does (the paper states a constant alpha)."),
                _fraction("full_res_start", full_start,
                          "Cross-image attention in the decoder layers at the latent's resolution (64x64 tokens "
                          "at 512 px) from this fraction of the steps (paper: 0.1)."),
                _fraction("full_res_end", full_end, "... until this fraction, exclusive (paper: 0.9)."),
                _fraction("half_res_start", half_start,
                          "Cross-image attention in the decoder layers at half the latent's resolution (32x32 at "
                          "512 px) from this fraction of the steps (paper: 0.1)."),
                _fraction("half_res_end", half_end, "... until this fraction, exclusive (paper: 0.7)."),
                _fraction("adain_start", PAPER_ADAIN[0],
                          "AdaIN of the output latent to the appearance latent after each step from this "
                          "fraction (paper: 0.2)."),
                _fraction("adain_end", PAPER_ADAIN[1], "... until this fraction, exclusive (paper: 1.0, the end)."),
                io.Int.Input("injection_period", default=5, min=0, max=1000,
                             tooltip="Structure injection: every this many steps the output attends to the "
                                     "structure's keys/values instead (official code: 5). 0: never."),
                _fraction("injection_until", 0.4,
                          "Structure injection only before this fraction of the steps (official code: 0.4)."),
                io.Mask.Input("output_mask", optional=True,
                              tooltip="The object in the structure image (same size): AdaIN then matches "
                                      "statistics inside it only and leaves the rest alone."),
                io.Mask.Input("appearance_mask", optional=True,
                              tooltip="The object in the appearance image (same size): AdaIN then takes the "
                                      "appearance statistics inside it only."),
                *dit_window_inputs(*DIT_WINDOW, what="cross-image attention (with the full_res step window)"),
            ],
            outputs=[
                io.Latent.Output(display_name="latent",
                                 tooltip="The appearance-transferred image: connect to VAEDecode."),
                io.Latent.Output(display_name="appearance_reconstruction",
                                 tooltip="The appearance row after inversion and generation: a check of "
                                         "inversion quality."),
                io.Latent.Output(display_name="structure_reconstruction",
                                 tooltip="The structure row after inversion and generation."),
            ],
        )

    @classmethod
    def validate_inputs(cls, full_res_start=None, full_res_end=None, half_res_start=None, half_res_end=None,
                        adain_start=None, adain_end=None):
        # Only the window ends are declared (ComfyUI then skips its own range checks for them alone), so
        # a reversed or out-of-range window is refused before the graph runs.
        for name, start, end in (("the full_res window", full_res_start, full_res_end),
                                 ("the half_res window", half_res_start, half_res_end),
                                 ("the AdaIN window", adain_start, adain_end)):
            if start is None or end is None:  # linked inputs: checked in execute
                continue
            try:
                check_window(name, (start, end))
            except ValueError as err:
                return str(err)
        return True

    @classmethod
    def execute(cls, model, positive, negative, inverted: AppearanceInverted, cfg, contrast, contrast_clip,
                appearance_guidance, guidance_decay, full_res_start, full_res_end, half_res_start, half_res_end,
                adain_start, adain_end, injection_period, injection_until, output_mask=None,
                appearance_mask=None, dit_block_start=DIT_WINDOW[0], dit_block_end=DIT_WINDOW[1]) -> io.NodeOutput:
        validate.unet(model)
        validate.conditioning_width(model, positive, "positive")
        validate.conditioning_width(model, negative, "negative")
        validate.inpaint_conditioning_free(positive, "HA_CrossImageSampler")
        validate.inpaint_conditioning_free(negative, "HA_CrossImageSampler")
        family = pipeline.model_family(model)
        if family != inverted.model_family:
            raise ValueError(f"the latents were inverted with a {inverted.model_family} model but this sampler has a "
                             f"{family} model: connect the same MODEL to both nodes")
        schedule = CrossImageSchedule(
            steps=len(inverted.sigmas) - 1,
            windows={1: (full_res_start, full_res_end), 2: (half_res_start, half_res_end)},
            injection_period=injection_period, injection_until=injection_until, adain=(adain_start, adain_end),
            alpha=appearance_guidance, alpha_decay=guidance_decay,
        )
        h, w = inverted.latents.shape[-2:]
        pairs = inverted.layout.pairs
        for name, mask in (("output_mask", output_mask), ("appearance_mask", appearance_mask)):
            if mask is None:
                continue
            validate.mask(name, mask)
            if tuple(mask.shape[-2:]) != inverted.image_size:
                raise ValueError(f"{name} is {mask.shape[-1]}x{mask.shape[-2]} but the images are "
                                 f"{inverted.image_size[1]}x{inverted.image_size[0]} (WxH): resize the mask to the "
                                 "images")
            if mask.shape[0] not in (1, pairs):
                raise ValueError(f"{name} has a batch of {mask.shape[0]} but {pairs} pair(s) were inverted: give "
                                 "one mask for all pairs, or one per pair")
            m = _latent_masks(mask, pairs, h, w)
            empty = [b for b in range(m.shape[0]) if not m[b].any()]
            if empty:  # the mask rule keeps a cell for any non-empty mask: these rows are all zero
                raise ValueError(f"{name} is empty (all zero) in batch row(s) {empty}: draw the region or leave "
                                 "the input unconnected")
        check_dit_window(dit_block_start, dit_block_end)
        notes = logged(model_notes(model, "HA_CrossImageSampler", GUIDANCE_STEP_CACHES))
        out, app, struct = generate(model, positive, negative, inverted, cfg, schedule, contrast, contrast_clip,
                                    output_mask, appearance_mask, (dit_block_start, dit_block_end))
        return io.NodeOutput({"samples": out}, {"samples": app}, {"samples": struct}, ui=_ui_text([], "", [], warnings=notes))


NODES = [AppearanceInversion, CrossImageSampler]
