"""Harmonizing Attention's five stages as ComfyUI nodes (+ HA_AddGeometry for several geometries): schema, checks,
one call each.

Node IDs are workflow identity: never rename one.
"""
from __future__ import annotations

import logging
import math
from dataclasses import replace

from comfy_api.latest import io, ui

from ..attention import color, edit, tokens
from ..attention import window as working_region
from ..attention.kv import AUTO_AREA
from ..attention.roles import BALANCE_MODES, GEOMETRY_PRESERVING_MODES, TEXTURE_ALIGNING_MODES, balance
from . import families, patch, pipeline, placement_view, renoise, validate
from .naming import DEFECT_CATEGORY as CATEGORY
from .naming import DEFECT_WORDS, search_aliases
from .pipeline import Inverted, Scene

SceneType = io.Custom("HA_SCENE")
InvertedType = io.Custom("HA_INVERTED")

COLOR_MODES = ("mean_shift", "none", "histogram", "regional")
AUTO_SHARE = f"{100 * AUTO_AREA / (1 + AUTO_AREA):.1f}%"

BALANCE_WEIGHT_TOOLTIP = ("manual: the weight w on the reference keys' total attention (log w added to their logits); "
                          "1 = the paper, 2 doubles their mass before the softmax normalises. auto: multiplies the "
                          "automatic weight (1 = the canonical share).")


def balance_inputs(reference: str, auto_note: str) -> list:
    return [
        io.Combo.Input("balance", options=list(BALANCE_MODES), default="paper", optional=True,
                       tooltip=f"Weight of the {reference} against the row's own tokens. paper: as published (w = 1). "
                               f"manual: w = balance_weight. auto: {auto_note} The weights each layer got are "
                               "shown on the node and logged."),
        io.Float.Input("balance_weight", default=1.0, min=0.01, max=100.0, step=0.01, optional=True,
                       tooltip=BALANCE_WEIGHT_TOOLTIP),
    ]


def _ui_text(notes: list[str], stage: str, balance_lines: list[str], warnings: list[str] = ()) -> dict:
    """The node's UI output. "ha_notes": its sections as {"level": "info" | "warning", "text"}: the notes, the warnings
    (what defeats or degrades the method here and was neutralised), the balance each layer got; always there, so a run
    with nothing to say replaces the last run's notes. web/notes.js shows them on the node (the frontends draw a "text"
    output on their PreviewAny node only). "text": the same sections in one string, for API users and /history; absent
    when there is nothing to say."""
    sections = [{"level": "info", "text": n} for n in notes] + [{"level": "warning", "text": w} for w in warnings]
    if balance_lines:
        sections.append({"level": "info", "text": f"{stage} balance per layer (keys, weight, share at equal logits):\n"
                                                  + "\n".join(balance_lines)})
    text = ui.PreviewText("\n\n".join(s["text"] for s in sections)).as_dict() if sections else {}
    return {**text, "ha_notes": sections}


def logged(notes: list[str]) -> list[str]:
    """`notes`, each logged as a warning (the node's UI text shows them too)."""
    for note in notes:
        logging.warning("Harmonizing Attention: %s", note)
    return notes


SMALL_REGION_CELLS = 4.0  # a region with less area than this many latent cells is "small"


def region_notes(scene: Scene, cell: int, window: working_region.Window | None = None) -> list[str]:
    """What to tell the user about each mask that is small or thinner than a latent cell (cell x cell pixels):
    the blend, the inpainting mask and the attention tokens all work per latent cell (attention/tokens.py).
    `scene` is what the model runs on; `window` the working region it was resampled from (None: its own pixels)."""
    height, width = scene.target.shape[1:3]
    h, w = height // cell, width // cell
    working = window is not None and window.working_size > 0
    notes = []
    for name, masks in (("source_mask", scene.source_mask), ("geometry_mask", scene.geometry_mask)):
        for row, (kept, area, mean) in enumerate(tokens.summary(masks, h, w)):
            if not kept or (area >= SMALL_REGION_CELLS and mean >= 0.5):
                continue
            what = " and ".join(w for w, on in (("small", area < SMALL_REGION_CELLS),
                                                ("thinner than a latent cell", mean < 0.5)) if on)
            label = f"{name} {row}" if masks.shape[0] > 1 else name
            counts = (f"{int(masks[row].sum())} px, {area:.1f} cells' worth of area, carried on {kept} latent cells "
                      f"that it covers {mean:.0%} on average. The blend, the inpainting mask and the attention tokens "
                      f"work per latent cell, so this geometry is kept only to about a cell.")
            if not working:
                notes.append(
                    f"{label} is {what} for the {w}x{h} latent grid ({cell}x{cell} px cells): {counts} For finer "
                    f"detail, upscale source and target (e.g. ImageScaleBy 2x before HA_GeometryImageEdit) or dilate "
                    f"the mask (GrowMask) to at least {cell} px wide.")
                continue
            span = cell / window.factor  # full-resolution pixels per latent cell
            notes.append(
                f"{label} is {what} for the {w}x{h} latent grid of the working region ({cell}x{cell} px cells of the "
                f"canvas, each {span:.1f}x{span:.1f} px of the full-resolution image: {window.describe()}): "
                f"{counts} For finer detail, raise working_size or lower context on HA_GeometryImageEdit (more canvas "
                f"pixels per image pixel) or dilate the mask (GrowMask) to at least {math.ceil(span)} px wide.")
    return notes


def working_notes(scene: Scene, native_size: int) -> list[str]:
    """What the working region (scene.window) does that the user should know: an upscale it had to limit, a source
    mask it cuts, a working size unlike the model's own (`native_size` px a side)."""
    win, notes = scene.window, []
    if win.upscale_limited:
        ht, wt = win.target_hw
        notes.append(
            f"working region: the {wt}x{ht} target is too small for working_size {win.working_size} (a window is "
            f"enlarged at most {working_region.MAX_UPSCALE:g}x), so the model works on {win.describe()}, below its "
            f"working size: give a target of at least {math.ceil(win.working_size / working_region.MAX_UPSCALE)} px "
            "a side, or lower working_size.")
    elif win.working_size and win.working_size != native_size:
        notes.append(f"working region: working_size is {win.working_size} but this model works best at "
                     f"{native_size} px (set working_size {native_size} on HA_GeometryImageEdit).")
    bh, bw = win.size_hw
    for row, mask in enumerate(scene.source_mask):
        x0, y0, x1, y1 = working_region.mask_box(mask)
        if x1 - x0 > bw or y1 - y0 > bh:
            label = f"source_mask {row}" if scene.source_mask.shape[0] > 1 else "source_mask"
            notes.append(
                f"{label} spans {x1 - x0}x{y1 - y0} px, more than the {bw}x{bh} window cut from its source (the "
                "target's size): the part outside it is left out of the transfer. Set working_size on "
                "HA_GeometryImageEdit (its window grows to hold the whole mask) or scale the source down.")
    return notes


def dit_window_inputs(start: float = 0.0, end: float = 1.0, what: str = "the rule") -> list:
    """Optional inputs naming the blocks of a diffusion transformer that are patched; a UNet ignores them."""
    return [
        io.Float.Input("dit_block_start", default=start, min=0.0, max=1.0, step=0.01, optional=True,
                       tooltip=f"Diffusion transformers (Flux, SD3, Qwen-Image, Z-Image...) only: {what} acts in the "
                               "blocks from this fraction of the depth (blocks in call order: Flux's double-stream blocks, "
                               "then its single-stream ones; the i-th of n sits at i / n). UNets ignore it."),
        io.Float.Input("dit_block_end", default=end, min=0.0, max=1.0, step=0.01, optional=True,
                       tooltip="... until this fraction, exclusive (1: to the last block)."),
    ]


def check_dit_window(dit_block_start, dit_block_end) -> None:
    """In execute, before any work (ComfyUI checks each value's range itself)."""
    if dit_block_start > dit_block_end:
        raise ValueError(f"dit_block_start is {dit_block_start} but dit_block_end is {dit_block_end}: the window "
                         "starts after it ends; swap them")


def placement_inputs() -> list:
    """The four widgets of the edit T (attention/edit.py's Placement), shared by the nodes that place a geometry."""
    return [
        io.Float.Input("shift_x", default=0.0, min=-16384.0, max=16384.0, step=1.0,
                       tooltip="Target pixels, + right. 0 keeps the mask's relative position on the target."),
        io.Float.Input("shift_y", default=0.0, min=-16384.0, max=16384.0, step=1.0,
                       tooltip="Target pixels, + down."),
        io.Float.Input("scale", default=1.0, min=0.05, max=8.0, step=0.01,
                       tooltip="Uniform scale about the centre of the mask's bounding box."),
        io.Float.Input("rotation", default=0.0, min=-360.0, max=360.0, step=0.5,
                       tooltip="Degrees, counter-clockwise, about the centre of the mask's bounding box."),
    ]


def working_region_inputs() -> list:
    """HA_GeometryImageEdit's working region (attention/window.py): optional, off by default (saved workflows keep
    their results)."""
    return [
        io.Int.Input("working_size", default=0, min=0, max=4096, step=64, optional=True,
                     tooltip="The working region. 0: the method runs on the whole target at its own pixels. Else on "
                             "a window of the target around the geometry (all of them, with HA_AddGeometry) and its "
                             "context, resampled to about working_size x working_size px, the model's own size: 512 "
                             "for SD1.x, 768 for SD2.x v-prediction, 1024 for SDXL, Flux and SD3. Connect this scene "
                             "to HA_DetailPreservingComposite: it puts the result back into the full-resolution "
                             "target."),
        io.Float.Input("context", default=working_region.CONTEXT, min=0.0, max=4.0, step=0.05, optional=True,
                       tooltip="Working region: the target around the geometry that the model sees, on each side, as "
                               f"a fraction of the geometry's larger side (at least {working_region.MIN_MARGIN} px). "
                               "More context matches the texture over a wider area, at fewer canvas pixels per "
                               "image pixel."),
    ]


def check_working_size(working_size: int) -> None:
    if 0 < working_size < 64:
        raise ValueError(f"working_size is {working_size}: give 0 (the whole target at its own pixels) or a size of "
                         "64 px or more (512 for SD1.x, 1024 for SDXL, Flux and SD3)")


class GeometryImageEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HA_GeometryImageEdit",
            display_name="Crack/Defect Transfer · Place",
            category=CATEGORY,
            description="Places the crack, hole, scratch or other defect of the source photo on the target photo: cuts "
                        "the source by its mask and moves it by shift / scale / rotation (drag it in the node's "
                        "placement view). Source and target may have any sizes: at scale 1 a source pixel stays a "
                        "target pixel. Gives the pasted preview and the scene the next steps use. Paper: the "
                        "geometry image and its mask M_geo = T(M_src).",
            **search_aliases(DEFECT_WORDS, "place", "paste", "geometry image edit"),
            inputs=[
                io.Image.Input("source", tooltip="The image holding the geometry to transfer (holes, cracks, drops...)."),
                io.Mask.Input("source_mask", tooltip="1 on the geometry to transfer; binarised at 0.5. Same size as source."),
                io.Image.Input("target", tooltip="The image that receives the geometry and keeps its own texture."),
                *placement_inputs(),
                *working_region_inputs(),
            ],
            outputs=[
                io.Image.Output(display_name="geometry", tooltip="The moved source patch pasted on the target (for preview)."),
                io.Mask.Output(display_name="geometry_mask", tooltip="M_geo: the moved source mask on the target canvas."),
                SceneType.Output(display_name="scene", tooltip="Everything the later stages need, kept consistent."),
            ],
        )

    @classmethod
    def execute(cls, source, source_mask, target, shift_x, shift_y, scale, rotation, working_size=0,
                context=working_region.CONTEXT) -> io.NodeOutput:
        check_working_size(working_size)
        validate.image("source", source)
        validate.image("target", target)
        validate.mask("source_mask", source_mask)
        validate.source_mask(source_mask, source)
        validate.batches("source_mask", source_mask.shape[0], "source", source.shape[0])
        validate.batches("source", source.shape[0], "target", target.shape[0])
        source, target = source[..., :3], target[..., :3]
        if source_mask.shape[0] != source.shape[0]:
            n = max(source_mask.shape[0], source.shape[0])
            source, source_mask = source.expand(n, -1, -1, -1), source_mask.expand(n, -1, -1)
        placement = edit.Placement(shift_x=shift_x, shift_y=shift_y, scale=scale, rotation=rotation)
        geometry, geometry_mask = edit.place_source(source, source_mask, target, placement)
        pairs = geometry.shape[0]
        scene = Scene(
            source=source, source_mask=edit.binarize(source_mask),
            target=target.expand(pairs, -1, -1, -1) if target.shape[0] != pairs else target,
            geometry=geometry, geometry_mask=geometry_mask, working_size=working_size, context=context,
        )
        logging.info("Harmonizing Attention: the model will run on %s", scene.window.describe())
        return io.NodeOutput(geometry, geometry_mask, scene, ui=placement_view.ui_output(source, source_mask, target))


class ColorShift(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HA_ColorShift",
            display_name="Crack/Defect Transfer · Color Shift",
            category=CATEGORY,
            description="Moves the pasted patch's colour towards the target around it, keeping the colour differences "
                        "that draw the defect. Eq. 1: p_geo = p + a * M_geo * (c_tar - c_src), c_src / c_tar the mean "
                        "colours on rings around the source mask and around M_geo.",
            **search_aliases(DEFECT_WORDS, "color shift", "colour", "color match"),
            inputs=[
                SceneType.Input("scene"),
                io.Combo.Input("mode", options=list(COLOR_MODES), default="mean_shift",
                               tooltip="mean_shift: eq. 1 (paper). none: no adjustment (a = 0). histogram: match "
                                       "the patch's per-channel histogram to the target ring (the paper's ablation). "
                                       "regional: eq. 1 with c_tar varying across the patch, from the target ring's "
                                       "colours weighted by distance (follows light and colour gradients; equals "
                                       "mean_shift where the ring is uniform). Several geometries: each is shifted "
                                       "by its own rings."),
                io.Float.Input("strength", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="a in eq. 1: 0 keeps the source colour, 1 moves its mean fully to the target's. "
                                       "Paper: 0.5."),
                io.Int.Input("ring_width", default=8, min=1, max=256,
                             tooltip="Width in pixels of the rings dilate(M) - M whose mean colours are compared."),
            ],
            outputs=[
                io.Image.Output(display_name="geometry", tooltip="The colour-shifted geometry image (for preview)."),
                SceneType.Output(display_name="scene"),
            ],
        )

    @classmethod
    def execute(cls, scene: Scene, mode, strength, ring_width) -> io.NodeOutput:
        if mode not in COLOR_MODES:
            raise ValueError(f"colour mode {mode!r}: choose one of {COLOR_MODES}")
        geometry = scene.geometry
        for source, source_mask, part in scene.parts():  # one geometry: (scene.source, .source_mask, .geometry_mask)
            geometry = _shift_part(mode, geometry, part, source, source_mask, scene.target, strength, ring_width)
        return io.NodeOutput(geometry, replace(scene, geometry=geometry, color_adjusted=True))


def _shift_part(mode, geometry, part, source, source_mask, target, strength, ring_width):
    """Colour-adjust the pixels of one geometry's visible part (rows where it is hidden stay as they are)."""
    if mode == "none":
        return geometry
    shown = part.flatten(1).amax(1) >= 0.5
    if not shown.all():  # hidden under later geometries in some pairs: adjust the other pairs only
        out = geometry.clone()
        if shown.any():
            pick = lambda t: t[shown] if t.shape[0] > 1 else t  # noqa: E731
            out[shown] = _shift_part(mode, geometry[shown], part[shown], pick(source), pick(source_mask),
                                     pick(target), strength, ring_width)
        return out
    if mode == "histogram":
        return color.histogram_match(geometry, part, target, ring_width)
    shift = color.regional_shift if mode == "regional" else color.mean_shift
    return shift(geometry, part, source, source_mask, target, strength, ring_width)


class TextureAligningInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HA_TextureAligningInversion",
            display_name="Crack/Defect Transfer · Texture Inversion",
            category=CATEGORY,
            description="Turns the source, target and pasted images into noise, pulling the pasted patch into the "
                        "target's texture on the way. DDIM inversion with ReNoise of the three images in one batch; "
                        "the pasted rows use Texture-aligning Attention (eq. 3): their queries also attend to the "
                        "target's keys and values.",
            **search_aliases(DEFECT_WORDS, "texture", "texture-aligning inversion", "inversion", "ddim inversion",
                             "renoise"),
            inputs=[
                io.Model.Input("model", tooltip=f"{families.SUPPORTED}. The paper uses SD1.5 inpainting."),
                io.Vae.Input("vae"),
                io.Conditioning.Input("conditioning",
                                      tooltip="The prompt's conditioning (paper: empty prompt), straight from "
                                              "CLIPTextEncode. Inpainting inputs are added per row by this node."),
                SceneType.Input("scene"),
                io.Int.Input("steps", default=25, min=1, max=1000,
                             tooltip="DDIM steps (paper: 25; distilled few-step models: 4-8, see scheduler). The "
                                     "sampler reuses them."),
                *renoise.inputs(" (paper: 5)"),
                io.Combo.Input("attention", options=list(TEXTURE_ALIGNING_MODES), default="texture_aligning",
                               tooltip="texture_aligning: [K_geo; K_tar] (eq. 3). geometry_only: plain self-attention. "
                                       "target_only: K_tar only (the paper's ablation 4.6.2)."),
                *balance_inputs("target's keys (texture)",
                                "the reference here is the whole target, whose share (1/2 at equal logits) never "
                                "depends on the region's size, so auto is w = balance_weight (1: the paper)."),
                *dit_window_inputs(what="Texture-aligning Attention"),
                renoise.scheduler_input(),
            ],
            outputs=[InvertedType.Output(display_name="inverted", tooltip="Inverted latents with their schedule and masks.")],
        )

    @classmethod
    def validate_inputs(cls, renoise_iterations=None, renoise_average=None):
        return renoise.validate_inputs(renoise_iterations, renoise_average)

    @classmethod
    def execute(cls, model, vae, conditioning, scene: Scene, steps, renoise_iterations, renoise_average,
                attention, balance="paper", balance_weight=1.0, dit_block_start=0.0, dit_block_end=1.0,
                scheduler=pipeline.DEFAULT_SCHEDULER) -> io.NodeOutput:
        validate.unet(model)
        validate.conditioning_width(model, conditioning, "the conditioning")
        validate.inpaint_conditioning_free(conditioning, "HA_TextureAligningInversion")
        validate.vae(model, vae)
        renoise.check(renoise_iterations, renoise_average)
        check_dit_window(dit_block_start, dit_block_end)
        weights, report = _balance(balance, balance_weight), []
        work = pipeline.working_scene(scene, families.pixel_step(model))
        notes = logged(patch.model_notes(model, "HA_TextureAligningInversion", renoise.STEP_CACHES)
                       + working_notes(scene, families.native_size(model))
                       + region_notes(work, vae.spacial_compression_encode(), scene.window))
        inverted = pipeline.invert(model, vae, conditioning, work, steps, renoise_iterations, renoise_average,
                                   attention, (dit_block_start, dit_block_end), balance=weights, report=report,
                                   scheduler=scheduler)
        ran, *warned = renoise.schedule_notes(model, scheduler, inverted.scheduler, steps, inverted.sigmas, renoise_iterations)
        return io.NodeOutput(inverted, ui=_ui_text([ran], "texture-aligning", report, warnings=[*warned, *notes]))


class LatentBlend(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HA_LatentBlend",
            display_name="Crack/Defect Transfer · Latent Blend",
            category=CATEGORY,
            description="Starts the generation from the target's noise, with the pasted patch's noise inside its mask. "
                        "Eq. 4: z_out = z_geo * m_geo + z_tar * (1 - m_geo), m_geo the geometry mask at latent size.",
            **search_aliases(DEFECT_WORDS, "latent blend", "blend"),
            inputs=[
                InvertedType.Input("inverted"),
                io.Float.Input("feather", default=0.0, min=0.0, max=16.0, step=0.1,
                               tooltip="0: binary mask (paper). Otherwise the Gaussian blur (latent pixels) of its edge."),
            ],
            outputs=[InvertedType.Output(display_name="inverted", tooltip="The same, with the blended starting latent z_T^out.")],
        )

    @classmethod
    def execute(cls, inverted: Inverted, feather) -> io.NodeOutput:
        return io.NodeOutput(pipeline.blend_latents(inverted, feather))


# why the sampler suspends step caches (patch.model_notes), on a UNet and on a diffusion transformer
SAMPLER_STEP_CACHES = {
    False: "the output pass replays the sources' pass evaluation by evaluation, and a step cache's skipped "
           "evaluations would fail the replay or silently change the result.",
    True: "a step cache would put earlier outputs in place of Geometry-preserving Attention's steps, to save part of "
          "a pass that is about 12% of the run's model work (25 steps after 25 x 5 ReNoise evaluations).",
}


class GeometryPreservingSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HA_GeometryPreservingSampler",
            display_name="Crack/Defect Transfer · Sampler",
            category=CATEGORY,
            description="Generates the result from the blended noise and keeps the defect's shape. DDIM over the "
                        "inversion's schedule, denoising the blended latent together with the "
                        "source. The output rows use Geometry-preserving Attention (eqs. 5-7): they also attend "
                        "to the source's tokens inside the source mask (with several geometries: every source's, each "
                        "inside its own mask), so the geometry survives denoising.",
            **search_aliases(DEFECT_WORDS, "sampler", "geometry-preserving sampler", "ddim"),
            inputs=[
                io.Model.Input("model", tooltip="The model the inversion used."),
                io.Conditioning.Input("positive", tooltip="Paper: the empty prompt, as for the inversion."),
                io.Conditioning.Input("negative", tooltip="Used only when cfg != 1."),
                InvertedType.Input("inverted", tooltip="From HA_LatentBlend."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance. 1 (paper): the negative prompt is not evaluated."),
                io.Combo.Input("attention", options=list(GEOMETRY_PRESERVING_MODES), default="geometry_preserving",
                               tooltip="geometry_preserving: [K_out; K_src inside M_src] (eq. 5). self_only: plain "
                                       "self-attention. source_only: K_src inside M_src only (ablation 4.6.3)."),
                *balance_inputs("source's keys inside its mask (geometry)",
                                "the paper's source share follows the region's size (about 1% for a region of 1% of "
                                "the image, 29% for 40%: sec. 4.7's limit); auto gives every region, at every layer, "
                                f"the share the paper gives a region of {AUTO_AREA:.0%} of the image ({AUTO_SHARE} at "
                                "equal logits), times balance_weight. With several geometries, each source on its own."),
                *dit_window_inputs(what="Geometry-preserving Attention"),
            ],
            outputs=[
                io.Latent.Output(display_name="latent", tooltip="The composites, one per pair: connect to VAEDecode."),
                io.Latent.Output(display_name="source_reconstruction",
                                 tooltip="The source row after inversion and generation: a check of inversion quality."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, inverted: Inverted, cfg, attention, balance="paper",
                balance_weight=1.0, dit_block_start=0.0, dit_block_end=1.0) -> io.NodeOutput:
        validate.unet(model)
        validate.conditioning_width(model, positive, "positive")
        validate.conditioning_width(model, negative, "negative")
        validate.inpaint_conditioning_free(positive, "HA_GeometryPreservingSampler")
        validate.inpaint_conditioning_free(negative, "HA_GeometryPreservingSampler")
        if inverted.blended is None:
            raise ValueError("the inverted latents have not been blended: connect HA_LatentBlend between "
                             "HA_TextureAligningInversion and HA_GeometryPreservingSampler")
        family = pipeline.model_family(model)
        if family != inverted.model_family:
            raise ValueError(f"the latents were inverted with a {inverted.model_family} model but this sampler has a "
                             f"{family} model: connect the same MODEL to both nodes")
        check_dit_window(dit_block_start, dit_block_end)
        weights, report = _balance(balance, balance_weight), []
        notes = logged(patch.model_notes(model, "HA_GeometryPreservingSampler", SAMPLER_STEP_CACHES[families.is_dit(model)]))
        out, src = pipeline.generate(model, positive, negative, inverted, cfg, attention, (dit_block_start, dit_block_end),
                                     balance=weights, report=report, notes=(ran := []))
        return io.NodeOutput({"samples": out}, {"samples": src}, ui=_ui_text(ran, "geometry-preserving", report, warnings=notes))


def _balance(mode, weight):
    if mode not in BALANCE_MODES:
        raise ValueError(f"balance {mode!r}: choose one of {BALANCE_MODES}")
    return balance(mode, weight)


class AddGeometry(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HA_AddGeometry",
            display_name="Crack/Defect Transfer · Add Another",
            category=CATEGORY,
            description="Adds one more crack or defect (source, mask, placement) to the scene, for several on one "
                        "target in one inversion and one generation. Chain one per extra defect after "
                        "Place, before Color Shift. Where placements overlap, the geometry added "
                        "last is on top (its pixels and mask win). The output attends to every source inside its "
                        "own mask; the batch gains one source row per geometry.",
            **search_aliases(DEFECT_WORDS, "add geometry", "several", "multiple"),
            inputs=[
                SceneType.Input("scene", tooltip="From HA_GeometryImageEdit or another HA_AddGeometry."),
                io.Image.Input("source", tooltip="The image holding this geometry (any size)."),
                io.Mask.Input("source_mask", tooltip="1 on the geometry to transfer; binarised at 0.5. Same size as source."),
                *placement_inputs(),
            ],
            outputs=[
                io.Image.Output(display_name="geometry", tooltip="Every geometry so far pasted on the target (for preview)."),
                io.Mask.Output(display_name="geometry_mask", tooltip="The union of the geometries' masks on the target."),
                SceneType.Output(display_name="scene"),
            ],
        )

    @classmethod
    def execute(cls, scene: Scene, source, source_mask, shift_x, shift_y, scale, rotation) -> io.NodeOutput:
        if scene.color_adjusted:
            raise ValueError("this scene has been through HA_ColorShift: add every geometry first (HA_AddGeometry "
                             "chain), then HA_ColorShift once, so each geometry is shifted exactly once by its own rings")
        validate.image("source", source)
        validate.mask("source_mask", source_mask)
        validate.source_mask(source_mask, source)
        validate.batches("source_mask", source_mask.shape[0], "source", source.shape[0])
        pairs, n = scene.geometry.shape[0], max(source.shape[0], source_mask.shape[0])
        if n not in (1, pairs):
            raise ValueError(f"source has a batch of {n} but the scene has {pairs} targets: give one source, "
                             "or one per target")
        placement = edit.Placement(shift_x=shift_x, shift_y=shift_y, scale=scale, rotation=rotation)
        scene = pipeline.add_geometry(scene, source.to(scene.source), source_mask.to(scene.source_mask), placement)
        return io.NodeOutput(scene.geometry, scene.geometry_mask, scene,
                             ui=placement_view.ui_output(source, source_mask, scene.target))


NODES = [GeometryImageEdit, ColorShift, TextureAligningInversion, LatentBlend, GeometryPreservingSampler, AddGeometry]
