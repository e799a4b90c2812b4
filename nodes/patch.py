"""The one module that knows ComfyUI's attention patch API.

`apply_plan` clones a ModelPatcher and installs, on every self-attention (attn1) block of the UNet,
a replace patch that consults a `RowPlan`: which batch row attends to which rows' keys/values.
Blocks are discovered from the loaded model (no SD1.5 block list), so any UNet built from
ComfyUI's SpatialTransformer (SD1.x, SD2.x, SDXL) is covered.

Chaining: a replace patch already registered for a block (by another node, under ComfyUI's
(stage, id, index) or (stage, id) key) is wrapped, not overwritten: it still computes the
attention of the whole batch, and only the rows our plan redirects are recomputed. A patch that
another node installs for one pass only (PerturbedAttentionGuidance's perturbed pass, under the
(stage, id) key) takes over that pass, as it intends.

Diffusion transformers (the families of nodes/families.py: Flux.1, Flux.2, Chroma, SD3.x, Qwen-Image,
Z-Image) take the DiT path (`apply_dit_plan`), through three model-agnostic hooks and no class or forward
of the model:
- an APPLY_MODEL wrapper gives each model call a `DitCall` holding the latent's (h, w), from which
  the patchified token grid follows, and the context's text length as the family pads it;
- a `patches_replace["dit"]` replace on each block in the layer window passes the block its place
  (`DitBlock`) in a copy of transformer_options, records the block's text length (its "txt" input;
  Flux's single blocks reuse the double blocks' one), and chains to a replace already there. A family
  without block replaces (Z-Image's NextDiT) names its blocks in transformer_options itself
  (block_type / block_index), which is read instead;
- `transformer_options["optimized_attention_override"]` runs the rule in the joint attention of
  those blocks (the image tokens of a [text; image; ...] sequence, or a sequence of image tokens
  alone) and hands every other call to the override already installed, or to ComfyUI's kernel.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch

import comfy.patcher_extension
from comfy.ldm.modules.attention import SpatialTransformer, optimized_attention

from ..attention.roles import Layer, RowPlan
from . import families
from .families import UnsupportedModel


def self_attention_blocks(model) -> list[tuple[str, int, int]]:
    """(stage, block id, transformer index) of every self-attention block, as ComfyUI keys them."""
    unet = model.get_model_object("diffusion_model")
    family = families.model_name(model)
    if not all(hasattr(unet, name) for name in ("input_blocks", "middle_block", "output_blocks")):
        raise UnsupportedModel(
            f"this model is {family} (a {type(unet).__name__} diffusion model), not a UNet of SpatialTransformers "
            f"nor a supported diffusion transformer: Harmonizing Attention patches the self-attention of "
            f"{families.SUPPORTED}, "
            "whose attention ComfyUI lets a node take over through its model patches. Load one of those checkpoints."
        )
    keys = []
    for stage, blocks in (("input", unet.input_blocks), ("middle", [unet.middle_block]), ("output", unet.output_blocks)):
        for block_id, block in enumerate(blocks):
            for layer in block:
                if isinstance(layer, SpatialTransformer):
                    keys += [(stage, block_id, i) for i in range(len(layer.transformer_blocks))]
    if not keys:
        raise UnsupportedModel(
            f"this {family} UNet ({type(unet).__name__}) has no SpatialTransformer self-attention block: nothing "
            "for Harmonizing Attention to patch. Load an SD1.x / SD2.x / SDXL checkpoint."
        )
    return keys


def schedule_position(extra_options) -> float | None:
    """Position of the current sigma in the schedule being sampled, 0 .. 1 (exclusive)."""
    sigmas, schedule = extra_options.get("sigmas"), extra_options.get("sample_sigmas")
    if sigmas is None or schedule is None or len(schedule) < 2:
        return None
    index = int(torch.argmin((schedule.to(sigmas.device) - sigmas.max()).abs()))
    return min(index, len(schedule) - 2) / (len(schedule) - 1)


def _downscale(latent_hw, layer_hw) -> int:
    """Latent size / layer size as the UNet's power of two. Each level halves rounding up (stride-2 conv,
    padding 1), so a 13-wide latent has 13, 7, 4 wide layers: 13 / 4 would round to 3, not 4."""
    (H, W), (h, w) = (int(v) for v in latent_hw), (int(v) for v in layer_hw)
    d = 1
    while (H, W) != (h, w) and (H > h or W > w):
        H, W, d = -(-H // 2), -(-W // 2), 2 * d
    return d


class _PerCall:
    """Host-side values of one model call, worked out once per call: reading a GPU tensor's value syncs the GPU,
    so per layer it would sync once per layer. Keyed by the call's sigmas tensor, which every layer of a call
    shares (and which is held here, so a later call's tensor cannot take its place in memory)."""

    def __init__(self):
        self._sigmas, self._values = None, {}

    def get(self, options, name: str, compute):
        sigmas = options.get("sigmas")
        if sigmas is not self._sigmas:
            self._sigmas, self._values = sigmas, {}
        if name not in self._values:
            self._values[name] = compute()
        return self._values[name]


def make_replace(plan: RowPlan, previous=None):
    per_call = _PerCall()

    def attn1_replace(q, k, v, extra_options):
        flags = extra_options.get("cond_or_uncond", [0])
        chunks = len(flags)
        rows, rest = divmod(q.shape[0], chunks)
        if rest or rows != plan.rows:
            raise RuntimeError(
                f"Harmonizing Attention expected {plan.rows} latent rows per conditioning chunk, got a "
                f"self-attention batch of {q.shape[0]} rows in {chunks} chunk(s). A node between ours and "
                "the sampler changed the batch (e.g. a batch split or repeat): sample with the pack's own nodes."
            )
        h, w = extra_options["activations_shape"][-2:]
        layer = Layer(
            stage=extra_options["block"][0],
            downscale=_downscale(extra_options["original_shape"][-2:], (h, w)),
            step=per_call.get(extra_options, "step", lambda: schedule_position(extra_options)) if plan.needs_step else None,
        )
        if plan.record is not None or plan.replay is not None:
            sigmas = per_call.get(extra_options, "sigmas", lambda: extra_options["sigmas"].reshape(-1).tolist())
            keys = [(tuple(extra_options["block"]), extra_options.get("block_index", 0),
                     sigmas[min(c * rows, len(sigmas) - 1)], flags[c]) for c in range(chunks)]
        if plan.record is not None:
            tokens = plan.region_tokens(h, w, q.device)
            for c, key in enumerate(keys):
                plan.record.record(key, k[c * rows:(c + 1) * rows], v[c * rows:(c + 1) * rows],
                                   [tokens[j] for j in range(rows)])
        heads = extra_options["n_heads"]

        def kernel(q_, k_, v_, **mask):  # mask: only a balance's bias (kv.Balance); absent otherwise
            return optimized_attention(q_, k_, v_, heads, attn_precision=extra_options.get("attn_precision"),
                                       transformer_options=extra_options, **mask)

        base = previous(q, k, v, extra_options) if previous is not None else None
        recorded = ()
        if plan.replay is not None:  # recorded rows after the batch's: chunk c's at q.shape[0] + c * recorded
            replayed = [plan.replay.rows(key, k.shape[1], k.device) for key in keys]
            recorded = tuple(tuple(lengths) for _, _, lengths in replayed)
            k = torch.cat([k, *(r[0] for r in replayed)])
            v = torch.cat([v, *(r[1] for r in replayed)])
        program = plan.program(layer, h, w, chunks, k.shape[1], k.device, k.dtype, recorded=recorded)
        return program(q, k, v, kernel, plan.ref_kernel(heads), base, plan.balance_recorder(layer, h, w))

    return attn1_replace


def apply_plan(model, plan: RowPlan, dit_window: tuple[float, float] = (0.0, 1.0)):
    """A clone of `model` whose self-attention follows `plan`; `model` itself is left untouched.
    `dit_window`: on a diffusion transformer, the [start, end) fraction of its depth that is patched
    (see apply_dit_plan); a UNet ignores it."""
    if families.is_dit(model):
        return apply_dit_plan(model, plan, dit_window)
    blocks = self_attention_blocks(model)
    patched = model.clone()
    existing = patched.model_options["transformer_options"].get("patches_replace", {}).get("attn1", {})
    done = set()
    for stage, block_id, index in blocks:
        if (stage, block_id, index) in existing:
            patched.set_model_attn1_replace(make_replace(plan, existing[(stage, block_id, index)]),
                                            stage, block_id, index)
        elif (stage, block_id) not in done:
            patched.set_model_attn1_replace(make_replace(plan, existing.get((stage, block_id))), stage, block_id)
            done.add((stage, block_id))
    return patched


# ---------------------------------------------------------------- diffusion transformers

CALL_KEY = "harmonizing_attention_call"
BLOCK_KEY = "harmonizing_attention_block"
WRAPPER_KEY = "harmonizing_attention"


@dataclass
class DitCall:
    """One model call: the latent's (h, w) and the text length (the context's, then each block's "txt")."""

    latent_hw: tuple[int, int]
    txt: Optional[int] = None


@dataclass(frozen=True)
class DitBlock:
    kind: str  # "double_block" (Flux double stream, SD3 joint, Qwen-Image, Z-Image) or "single_block" (Flux single stream)
    index: int
    depth: float  # i / n for the i-th of the model's n blocks in call order


def _replaced_block(options) -> Optional[DitBlock]:
    """The block the pack's patches_replace["dit"] replace put in transformer_options (None outside its blocks)."""
    return options.get(BLOCK_KEY)


def _named_block(block_type: str, blocks: dict[int, DitBlock]) -> Callable[[dict], Optional[DitBlock]]:
    """For a forward that names its joint blocks itself (families.DitFamily.named_blocks: block_type, block_index i):
    the patched block of that index, else None."""
    def block_of(options) -> Optional[DitBlock]:
        return blocks.get(options.get("block_index")) if options.get("block_type") == block_type else None

    return block_of


@dataclass
class _Dit:
    plan: RowPlan
    patch: int  # latent cells per token side (families.patch_size: 2, Flux.2's 1)
    previous: object = None  # the optimized_attention_override this one chains to
    block_of: Callable[[dict], Optional[DitBlock]] = _replaced_block  # a layer call's block, from its options


def _call_wrapper(text_tokens: Callable[[int], int]):
    """The APPLY_MODEL wrapper; text_tokens: the context's length -> the text tokens the model attends to."""
    def wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        if x.ndim == 5 and x.shape[2] != 1:  # [B, C, T, H, W]: T frames would be T grids of image tokens
            raise RuntimeError(f"Harmonizing Attention takes single images, but this latent holds {x.shape[2]} frames "
                               f"({tuple(x.shape)}): encode each image on its own")
        # the text length until a block reports its own (SD3 may prepend register tokens to the context)
        txt = text_tokens(c_crossattn.shape[1]) if c_crossattn is not None else None
        options = {**transformer_options, CALL_KEY: DitCall(tuple(int(v) for v in x.shape[-2:]), txt)}
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)

    return wrapper


def _block_replace(block: DitBlock, previous):
    def replace(args, extra):
        options = dict(args.get("transformer_options") or {})
        call = options.get(CALL_KEY)
        if call is not None and args.get("txt") is not None:
            call.txt = args["txt"].shape[1]
        options[BLOCK_KEY] = block
        args = {**args, "transformer_options": options}
        return previous(args, extra) if previous is not None else extra["original_block"](args)

    return replace


def _split(dit: _Dit, call: DitCall, tokens: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(image span in the sequence, token grid (h, w)): the latent patchified p x p (padded up) gives
    h * w image tokens, after the block's text ([text; image; other]) or alone (image-only attention)."""
    h, w = (math.ceil(v / dit.patch) for v in call.latent_hw)
    n = h * w
    if tokens == n:
        return (0, n), (h, w)
    txt = call.txt
    if txt is None or txt + n > tokens:
        raise RuntimeError(
            f"Harmonizing Attention could not find the {h}x{w} image tokens of a {call.latent_hw[1]}x{call.latent_hw[0]} "
            f"latent in a joint attention of {tokens} tokens (text: {txt}): this model lays out its tokens in a way "
            f"the pack does not know. Use {families.DIT_NAMES} without reference-image inputs.")
    return (txt, txt + n), (h, w)


def _override(dit: _Dit):
    plan = dit.plan
    per_call = _PerCall()

    def override(func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        block, call = dit.block_of(options), options.get(CALL_KEY)

        def host(*a, **kw):
            return dit.previous(func, *a, **kw) if dit.previous is not None else func(*a, **kw)

        if block is None or call is None:
            return host(*args, **kwargs)
        q, k, v = args[:3]
        heads = args[3] if len(args) > 3 else kwargs["heads"]
        rest = {key: val for key, val in kwargs.items() if key != "heads"}
        # [B, heads, N, d] (Flux: skip_reshape) or [B, N, heads * d] (SD3; its v comes as [B, N, heads, d]),
        # as [B, N, heads, d] views
        if rest.get("skip_reshape", False):
            q4, k4, v4 = (t.transpose(1, 2) for t in (q, k, v))
        else:
            q4, k4, v4 = (t.reshape(t.shape[0], t.shape[1], heads, -1) for t in (q, k, v))
        batch, tokens = q4.shape[:2]
        chunks = len(options.get("cond_or_uncond", [0]))
        rows, left = divmod(batch, chunks)
        if left or rows != plan.rows:
            raise RuntimeError(
                f"Harmonizing Attention expected {plan.rows} latent rows per conditioning chunk, got a joint attention "
                f"batch of {batch} rows in {chunks} chunk(s). A node between ours and the sampler changed the batch "
                "(e.g. a batch split or repeat): sample with the pack's own nodes.")
        image, (h, w) = _split(dit, call, tokens)
        layer = Layer(stage="output", downscale=1,
                      step=per_call.get(options, "step", lambda: schedule_position(options)) if plan.needs_step else None)
        program = plan.program(layer, h, w, chunks, tokens, q.device, k4.dtype, image=image)
        if not program.effective:
            return host(*args, **kwargs)
        if rest.get("mask") is not None:
            raise RuntimeError("Harmonizing Attention cannot combine its rules with an attention mask in the "
                               "conditioning (e.g. from a regional prompt): remove the mask")
        out_4d = rest.pop("skip_output_reshape", False)
        rest["skip_reshape"] = True

        def kernel(q_, k_, v_, **mask):  # [b, N, heads, d] -> [b, N, heads, d]; mask: only a balance's bias
            out = func(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2), heads, **{**rest, **mask})
            return out.unflatten(-1, (heads, -1))

        ref_kernel = plan.ref_kernel(heads)
        if ref_kernel is not None:
            contrast = ref_kernel

            def ref_kernel(q_, k_, v_):
                return contrast(q_.flatten(2), k_.flatten(2), v_.flatten(2)).unflatten(-1, (heads, -1))

        base = None
        if dit.previous is not None:
            base = dit.previous(func, *args, **kwargs)
            base = base.transpose(1, 2) if out_4d else base.unflatten(-1, (heads, -1))
        out = program(q4, k4, v4, kernel, ref_kernel, base, plan.balance_recorder(layer, h, w))
        return out.transpose(1, 2) if out_4d else out.flatten(2)

    return override


def apply_dit_plan(model, plan: RowPlan, window: tuple[float, float] = (0.0, 1.0)):
    """A clone of a diffusion transformer whose joint attention follows `plan` in the blocks whose depth
    i / n (the i-th of its n blocks in call order) lies in [window[0], window[1]); `model` is left untouched.

    In the joint attention a whole ref is the referenced row's whole sequence (text and image), a region ref
    its image tokens inside the region, and a row whose rule leaves itself out keeps its own text (kv._joint);
    positional encodings stay as the model applied them before attention. Layers reach plan.rules as
    Layer("output", 1, step): every patched block plays the part of a UNet decoder layer at the latent's
    resolution."""
    start, end = window
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"the DiT block window is {start}-{end}: use fractions of the depth, 0 <= start <= end <= 1")
    family = families.family(model)
    keys = families.dit_blocks(model)
    placed = {key: DitBlock(key[0], key[1], i / len(keys)) for i, key in enumerate(keys) if start <= i / len(keys) < end}
    patched = model.clone()
    to = patched.model_options["transformer_options"]
    if family.named_blocks is None:
        existing = to.get("patches_replace", {}).get("dit", {})
        for key, block in placed.items():
            patched.set_model_patch_replace(_block_replace(block, existing.get(key)), "dit", *key)
        block_of = _replaced_block
    else:
        block_of = _named_block(family.named_blocks, {block.index: block for block in placed.values()})
    dit = _Dit(plan, families.patch_size(model), previous=to.get("optimized_attention_override"), block_of=block_of)
    text_tokens = partial(family.text_tokens, model.get_model_object("diffusion_model"))
    comfy.patcher_extension.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                                                 _call_wrapper(text_tokens), patched.model_options,
                                                 is_model_options=True)
    patched.model_options["transformer_options"]["optimized_attention_override"] = _override(dit)
    return patched


# ---------------------------------------------------------------- step caches and other samplers' model options

# Step caches skip a model evaluation whose input changed little since the previous one and reuse that one's
# output, counting evaluations as sampling steps. The pack's passes need every evaluation: ReNoise evaluates the model
# several times at one step, and a UNet's source pass is recorded and replayed evaluation by evaluation. They are
# known by the key of the wrappers they register (ModelPatcher.add_wrapper_with_key, or transformer_options["wrappers"]
# of the model options) and the transformer_options entry that holds their per-run state: wrapper key -> (name, state).
STEP_CACHES = {
    "easycache": ("EasyCache", "easycache"),  # comfy_extras/nodes_easycache.py (0.3.64 and 0.33), forks keeping its key
    "lazycache": ("LazyCache", "easycache"),  # the same file; its state sits under EasyCache's key
    "teacache": ("TeaCache", "teacache"),  # TeaCache ports built on ComfyUI's wrappers
}


def _wrapper_keys(model) -> set:
    to_wrappers = model.model_options.get("transformer_options", {}).get("wrappers", {})
    return {key for wrappers in (model.wrappers, to_wrappers) for by_key in wrappers.values() for key in by_key}


def step_caches(model) -> list[str]:
    """The names of the step caches on `model` (STEP_CACHES), in that table's order."""
    keys = _wrapper_keys(model)
    return [name for key, (name, _) in STEP_CACHES.items() if key in keys]


def without_step_caches(model):
    """A clone of `model` without its step caches (every wrapper under their keys, and their state), for a pass that
    needs every model evaluation; `model` itself, untouched, when it has none."""
    keys = _wrapper_keys(model) & STEP_CACHES.keys()
    if not keys:
        return model
    clone = model.clone()
    to = clone.model_options["transformer_options"]
    for wrappers in (clone.wrappers, to.get("wrappers", {})):
        for by_key in wrappers.values():
            for key in keys:
                by_key.pop(key, None)
    for key in keys:
        to.pop(STEP_CACHES[key][1], None)
    return clone


def has_denoise_mask_function(model) -> bool:
    """A denoise-mask function (DifferentialDiffusion's) is set: ComfyUI calls it only on a sampler given a denoise
    mask, which the pack's passes never are (see pipeline._FromLatent)."""
    return model.model_options.get("denoise_mask_function") is not None


def model_notes(model, node: str, why: str) -> list[str]:
    """What `node` tells the user about the patches on its MODEL that its passes do not run. `why`: why a step cache
    cannot run in the node's passes (a sentence)."""
    notes = []
    caches = step_caches(model)
    if caches:
        names = " and ".join(caches)
        notes.append(f"{names} on the MODEL is suspended in {node}: {why} {node} runs every model evaluation; the "
                     f"MODEL keeps {names} for your other nodes.")
    if has_denoise_mask_function(model):
        notes.append(
            f"DifferentialDiffusion (a denoise-mask function on the MODEL) has no effect in {node}: ComfyUI applies it "
            "only in a sampler given a denoise mask, and the pack samples from inverted latents without one (a denoise "
            "mask would hold the area outside it at the clean latent plus the sampler's noise, which is not where an "
            "inverted trajectory runs). A geometry transfer's soft edge is HA_LatentBlend's feather, and "
            "HA_DetailPreservingComposite's feather in pixels.")
    return notes
