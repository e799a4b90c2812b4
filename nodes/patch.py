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
"""
from __future__ import annotations

import torch

from comfy.ldm.modules.attention import SpatialTransformer, optimized_attention

from ..attention.kv import Ref, Refs, shared_attention
from ..attention.roles import Layer, RowPlan


class UnsupportedModel(ValueError):
    pass


def self_attention_blocks(model) -> list[tuple[str, int, int]]:
    """(stage, block id, transformer index) of every self-attention block, as ComfyUI keys them."""
    unet = model.get_model_object("diffusion_model")
    family = type(getattr(model.model, "model_config", model.model)).__name__  # e.g. SDXL, Flux, SD3
    if not all(hasattr(unet, name) for name in ("input_blocks", "middle_block", "output_blocks")):
        raise UnsupportedModel(
            f"this model is {family} (a {type(unet).__name__} diffusion model), not a UNet of SpatialTransformers: "
            "Harmonizing Attention patches the self-attention of SD1.x / SD2.x / SDXL UNets (and their inpainting "
            "versions). Load one of those checkpoints."
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


def is_inpainting(model) -> bool:
    return tuple(getattr(model.model, "concat_keys", ())) == ("mask", "masked_image")


def _shift(refs: Refs, offset: int, rows: int | None = None, recorded: int = 0) -> Refs:
    """refs of a chunk's row, shifted by `offset`; refs to recorded rows (row >= rows) moved to `recorded` on."""
    if refs is None:
        return None
    return tuple(Ref(r.row + offset, r.region_only) if rows is None or r.row < rows
                 else Ref(recorded + r.row - rows, True) for r in refs)


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


def make_replace(plan: RowPlan, previous=None):
    def attn1_replace(q, k, v, extra_options):
        chunks = len(extra_options.get("cond_or_uncond", [0]))
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
            step=schedule_position(extra_options) if plan.needs_step else None,
        )
        rules = list(plan.rules(layer))
        tokens = plan.region_tokens(h, w, q.device)
        regions = {c * rows + j: t for c in range(chunks) for j, t in tokens.items()}
        if plan.record is not None or plan.replay is not None:
            flags, sigmas = extra_options.get("cond_or_uncond", [0]), extra_options["sigmas"].reshape(-1)
            keys = [(tuple(extra_options["block"]), extra_options.get("block_index", 0),
                     float(sigmas[min(c * rows, len(sigmas) - 1)]), flags[c]) for c in range(chunks)]
        if plan.record is not None:
            for c, key in enumerate(keys):
                plan.record.record(key, k[c * rows:(c + 1) * rows], v[c * rows:(c + 1) * rows],
                                   [tokens[j] for j in range(rows)])
        heads = extra_options["n_heads"]

        def kernel(q_, k_, v_):
            return optimized_attention(q_, k_, v_, heads, attn_precision=extra_options.get("attn_precision"),
                                       transformer_options=extra_options)

        base = previous(q, k, v, extra_options) if previous is not None else None
        if plan.replay is not None:  # recorded rows after the batch's: chunk c's at q.shape[0] + c * recorded
            recorded = [plan.replay.rows(key, k.shape[1], k.device) for key in keys]
            per_chunk = recorded[0][0].shape[0]
            for c, (_, _, lengths) in enumerate(recorded):
                for s, n in enumerate(lengths):
                    regions[q.shape[0] + c * per_chunk + s] = torch.arange(n, device=q.device)
            rules = [_shift(rules[j], c * rows, rows, q.shape[0] + c * per_chunk) for c in range(chunks) for j in range(rows)]
            k = torch.cat([k, *(r[0] for r in recorded)])
            v = torch.cat([v, *(r[1] for r in recorded)])
        else:
            rules = [_shift(rules[j], c * rows) for c in range(chunks) for j in range(rows)]
        return shared_attention(q, k, v, rules, kernel, regions, ref_kernel=plan.ref_kernel(heads), base=base)

    return attn1_replace


def apply_plan(model, plan: RowPlan):
    """A clone of `model` whose self-attention follows `plan`; `model` itself is left untouched."""
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
