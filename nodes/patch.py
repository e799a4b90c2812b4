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
- the APPLY_MODEL wrapper below gives each model call the latent's (h, w), from which the patchified token
  grid follows, and the context's text length as the family pads it;
- a `patches_replace["dit"]` replace on each block in the layer window passes the block its place
  (`DitBlock`) in a copy of transformer_options, records the block's text length (its "txt" input;
  Flux's single blocks reuse the double blocks' one), and chains to a replace already there. A family
  without block replaces (Z-Image's NextDiT) names its blocks in transformer_options itself
  (block_type / block_index), which is read instead;
- `transformer_options["optimized_attention_override"]` runs the rule in the joint attention of
  those blocks (the image tokens of a [text; image; ...] sequence, or a sequence of image tokens
  alone) and hands every other call to the override already installed, or to ComfyUI's kernel.

Per model call, outside the layers (both paths): an APPLY_MODEL wrapper (`_model_wrapper`) runs before the
diffusion model, hence outside a compiled one, and resolves everything that depends on data into a `ModelCall`
in transformer_options: the rows' cond/uncond chunks (checked against the plan), the schedule position (read
from the call's sigma: the one host sync, once per call), each attention layer's kv.Program (the mask rule's
cells and token indices, the copy plan, the balance weights; cached per layout in the RowPlan) and, for a
replay, the layer's recorded keys/values already on the device; after the call it files what the layers
recorded (attention/trajectory.py). Layers are known before the call: a UNet's from its blocks (each level of
Downsample halves the latent, rounding up: `_grid`), a DiT's blocks and token grid from its family
(families.dit_blocks, families.patch_size; the text length as families' text_tokens pads it). A layer call then
reads the ModelCall and does tensor work only: no numpy, scipy, `.tolist()`, `float(tensor)` or host sync, and
every size it branches on comes from its tensors' shapes or the ModelCall's plain Python values, so
torch.compile traces it as one graph and guards on exactly those values. Record/replay keys each call by the
sigma and cond/uncond flag of its chunks (read in the wrapper), and each layer by its place in the model: a
UNet's (stage, block id, transformer index), a DiT's block key (kind, i) (its image tokens recorded: the
generation's source pass on either path, replayed in its output pass and on a re-run, nodes/pipeline.generate).

torch.compile (ComfyUI's TorchCompileModel, both versions; `_compile_for_pack`): its APPLY_MODEL wrapper swaps
in a `torch.compile`d diffusion model whose code Dynamo reuses for any call its guards accept. ComfyUI 0.33
compiles with a guard filter that drops every guard on transformer_options, where all of this patch's state
lives (patches_replace, optimized_attention_override, the ModelCall): code compiled for one patch state (even
the unpatched model) would run for another, silently. So a patched clone replaces that wrapper (under its
key "torch.compile", on the clone only) with one that runs the pack's own compiled copy on the same modules:
torch.compile, with the same settings (torch_compile_kwargs; a `mode` folded into inductor's options), of a
function that calls its module argument (`_run`), with a backend of its own (inductor:
`name="harmonizing_attention"`; Dynamo reuses compiled code only for an equal backend), its own recompile
budget (isolate_recompiles, RECOMPILE_LIMIT) and a guard filter that keeps what the user's kept plus every guard
on the pack's state. One copy per compile settings: the module is an input of the compiled frame, so the copy
serves every model, pass, re-run and re-executed TorchCompileModel, and holds no model. Dynamo recompiles only
when a guarded value changes: a new layout (model, image size, batch, cfg's chunking, the program structure when a
region's token count changes) - never per step. Each sampling pass logs how many compilations it caused
(`compilations()`).
"""
from __future__ import annotations

import functools
import inspect
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

import comfy.patcher_extension
from comfy.ldm.modules.attention import SpatialTransformer, optimized_attention
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample
from comfy.patcher_extension import WrappersMP
from comfy_api.torch_helpers.torch_compile import COMPILE_KEY, TORCH_COMPILE_KWARGS, apply_torch_compile_factory

from ..attention.roles import Layer, RowPlan
from . import families
from .families import UnsupportedModel


def self_attention_layers(model) -> dict[tuple[str, int, int], int]:
    """(stage, block id, transformer index) of every self-attention block, as ComfyUI keys them -> its level: the
    latent halved that many times (a Downsample before it in the encoder, an Upsample after it in the decoder)."""
    unet = model.get_model_object("diffusion_model")
    family = families.model_name(model)
    if not all(hasattr(unet, name) for name in ("input_blocks", "middle_block", "output_blocks")):
        raise UnsupportedModel(
            f"this model is {family} (a {type(unet).__name__} diffusion model), not a UNet of SpatialTransformers "
            f"nor a supported diffusion transformer: Harmonizing Attention patches the self-attention of "
            f"{families.SUPPORTED}, "
            "whose attention ComfyUI lets a node take over through its model patches. Load one of those checkpoints."
        )
    layers, level = {}, 0

    def add(stage, block_id, block):
        for layer in block:
            if isinstance(layer, SpatialTransformer):
                layers.update({(stage, block_id, i): level for i in range(len(layer.transformer_blocks))})

    for block_id, block in enumerate(unet.input_blocks):
        add("input", block_id, block)
        level += any(isinstance(m, Downsample) for m in block.modules())
    add("middle", 0, unet.middle_block)
    for block_id, block in enumerate(unet.output_blocks):
        add("output", block_id, block)
        level -= any(isinstance(m, Upsample) for m in block.modules())
    if not layers:
        raise UnsupportedModel(
            f"this {family} UNet ({type(unet).__name__}) has no SpatialTransformer self-attention block: nothing "
            "for Harmonizing Attention to patch. Load an SD1.x / SD2.x / SDXL checkpoint."
        )
    return layers


def self_attention_blocks(model) -> list[tuple[str, int, int]]:
    """(stage, block id, transformer index) of every self-attention block, as ComfyUI keys them."""
    return list(self_attention_layers(model))


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


def _grid(latent_hw, level: int) -> tuple[int, int]:
    """The (h, w) of a UNet layer `level` halvings (rounding up) below the latent."""
    h, w = (int(v) for v in latent_hw)
    for _ in range(level):
        h, w = -(-h // 2), -(-w // 2)
    return h, w


CALL_KEY = "harmonizing_attention_call"  # transformer_options key of the ModelCall (+ ".n" for a patch on a patch)
BLOCK_KEY = "harmonizing_attention_block"
WRAPPER_KEY = "harmonizing_attention"


@dataclass
class _LayerCall:
    """One attention layer's part of a ModelCall: its program, its (h, w) token grid, the gather index and region
    lengths of a recording (RowPlan.record_index), and a replay's recorded keys/values (reference-only rows)."""

    program: object
    hw: tuple[int, int]
    record: Optional[tuple[torch.Tensor, tuple[int, ...]]] = None
    ref_k: Optional[torch.Tensor] = None
    ref_v: Optional[torch.Tensor] = None


class ModelCall:
    """What the attention layers of one model call need that depends on data, resolved once, outside them.

    flags: cond_or_uncond of the batch's chunks; sigmas: the call's per-row sigma (the schedule position and the
    record/replay keys are read from it here: the call's one host sync); latent_hw: the latent's (h, w); txt: a
    DiT's text length (its blocks update it from their "txt" input). `layer()` resolves a layer once; the model
    wrapper resolves every layer before the call, so a layer call only reads `layers`."""

    def __init__(self, plan: RowPlan, latent_hw, flags, sigmas, sample_sigmas, device, txt: Optional[int] = None):
        self.plan, self.device, self.txt = plan, device, txt
        self.latent_hw = tuple(int(v) for v in latent_hw)
        self.flags = list(flags)
        self.chunks = len(self.flags)
        self.step = schedule_position({"sigmas": sigmas, "sample_sigmas": sample_sigmas}) if plan.needs_step else None
        self.keys = []
        if plan.record is not None or plan.replay is not None:
            values = sigmas.reshape(-1).tolist()
            self.keys = [(values[min(c * plan.rows, len(values) - 1)], self.flags[c]) for c in range(self.chunks)]
        self.replayed = [plan.replay.next(key) for key in self.keys] if plan.replay is not None else None
        self.recorded = {} if plan.record is not None else None  # layer -> (k, v) at the record index
        self.layers: dict = {}

    @classmethod
    def direct(cls, plan: RowPlan, options: dict, device) -> ModelCall:
        """The call state of a layer called with no model wrapper (a direct call of the patch: tests)."""
        if plan.record is not None or plan.replay is not None:
            raise RuntimeError("a recording or replaying plan needs the model wrapper apply_plan installs: sample "
                               "the model apply_plan returns")
        return cls(plan, options["original_shape"][-2:], options.get("cond_or_uncond", [0]), options.get("sigmas"),
                   options.get("sample_sigmas"), device)

    def check(self, batch: int, where: str) -> None:
        if batch != self.chunks * self.plan.rows:
            raise RuntimeError(
                f"Harmonizing Attention expected {self.plan.rows} latent rows per conditioning chunk, got a {where} "
                f"batch of {batch} rows in {self.chunks} chunk(s). A node between ours and the sampler changed the "
                "batch (e.g. a batch split or repeat): sample with the pack's own nodes.")

    def layer(self, key, stage: str, hw: tuple[int, int], downscale: int, joint: bool = False) -> _LayerCall:
        """The layer `key` at an (h, w) token grid `downscale` times below the latent, resolved once per call."""
        found = self.layers.get(key)
        if found is None:
            found = self.layers[key] = self._resolve(key, stage, hw, downscale, joint)
        return found

    def _resolve(self, key, stage, hw, downscale, joint) -> _LayerCall:
        plan, (h, w) = self.plan, hw
        ref_k = ref_v = None
        recorded = ()
        if self.replayed is not None:  # chunk c's recorded rows after chunk c - 1's
            entries = [layers.get(key) for layers in self.replayed]
            if None in entries:  # not recorded: a pass where another patch took this layer over (PAG's), or an error
                return _LayerCall(None, hw)
            recorded = tuple(lengths for _, _, lengths in entries)
            ref_k = torch.cat([k for k, _, _ in entries]).to(self.device)
            ref_v = torch.cat([v for _, v, _ in entries]).to(self.device)
        program = plan.program(Layer(stage, downscale, self.step), h, w, self.chunks, self.device, joint, recorded)
        record = plan.record_index(h, w, self.chunks, self.device) if plan.record is not None else None
        return _LayerCall(program, hw, record, ref_k, ref_v)

    def missing(self, key):
        return RuntimeError(f"no recorded source keys/values for the attention layer {key}: the output pass runs "
                            "another model than the source pass. Use the same MODEL for both.")

    def close(self) -> None:
        """After the call: file what the layers recorded, one recording per cond/uncond chunk."""
        if self.recorded is None:
            return
        rows = self.plan.rows
        for c, key in enumerate(self.keys):
            chunk = slice(c * rows, (c + 1) * rows)
            self.plan.record.record(key, {layer: (k[chunk], v[chunk], self.layers[layer].record[1])
                                          for layer, (k, v) in self.recorded.items()})


def _same_length(tokens: int) -> int:
    return tokens


def _model_wrapper(plan: RowPlan, key: str, resolve, text_tokens: Callable[[int], int]):
    """APPLY_MODEL wrapper: a ModelCall for each model call, every layer resolved (`resolve(call)`) before the
    diffusion model runs, filed after it. text_tokens: the context's length -> the text tokens a DiT attends to."""

    def wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        if x.ndim == 5 and x.shape[2] != 1:  # [B, C, T, H, W]: T frames would be T grids of image tokens
            raise RuntimeError(f"Harmonizing Attention takes single images, but this latent holds {x.shape[2]} frames "
                               f"({tuple(x.shape)}): encode each image on its own")
        # the text length until a block reports its own (SD3 may prepend register tokens to the context)
        txt = text_tokens(c_crossattn.shape[1]) if c_crossattn is not None else None
        call = ModelCall(plan, x.shape[-2:], transformer_options.get("cond_or_uncond", [0]), t,
                         transformer_options.get("sample_sigmas"), x.device, txt)
        call.check(x.shape[0], "model")
        resolve(call)
        out = executor(x, t, c_concat, c_crossattn, control, {**transformer_options, key: call}, **kwargs)
        call.close()
        return out

    return wrapper


def _call_key(patched) -> str:
    """CALL_KEY, or CALL_KEY.n on a model the pack has patched n times already (each patch reads its own)."""
    wrappers = patched.model_options["transformer_options"].get("wrappers", {}).get(WrappersMP.APPLY_MODEL, {})
    n = len(wrappers.get(WRAPPER_KEY, []))
    return CALL_KEY if n == 0 else f"{CALL_KEY}.{n}"


def _install(patched, plan: RowPlan, key: str, resolve, text_tokens: Callable[[int], int] = _same_length) -> None:
    comfy.patcher_extension.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                                                 _model_wrapper(plan, key, resolve, text_tokens),
                                                 patched.model_options, is_model_options=True)
    _compile_for_pack(patched)


def make_replace(plan: RowPlan, previous=None, key: str = CALL_KEY):
    def attn1_replace(q, k, v, extra_options):
        call = extra_options.get(key)
        if call is None:  # not through the model wrapper: resolved here, never inside a compiled model
            call = ModelCall.direct(plan, extra_options, q.device)
        stage, block_id = extra_options["block"]
        h, w = extra_options["activations_shape"][-2:]
        layer_key = (stage, block_id, extra_options.get("block_index", 0))
        layer = call.layers.get(layer_key)
        if layer is None:  # a direct call (the model wrapper resolved every layer)
            layer = call.layer(layer_key, stage, (h, w), _downscale(extra_options["original_shape"][-2:], (h, w)))
        if layer.hw != (h, w):
            raise RuntimeError(f"Harmonizing Attention expected a {layer.hw[1]}x{layer.hw[0]} self-attention grid at "
                               f"{layer_key}, got {w}x{h}: this UNet changes resolution in a way the pack does not know")
        if layer.program is None:
            raise call.missing(layer_key)
        call.check(q.shape[0], "self-attention")
        heads = extra_options["n_heads"]

        def kernel(q_, k_, v_, **mask):  # mask: only a balance's bias (kv.Balance); absent otherwise
            return optimized_attention(q_, k_, v_, heads, attn_precision=extra_options.get("attn_precision"),
                                       transformer_options=extra_options, **mask)

        base = previous(q, k, v, extra_options) if previous is not None else None
        if layer.record is not None:  # [batch, longest region, C]: each row's region tokens first
            index = layer.record[0][:, :, None].expand(-1, -1, k.shape[-1])
            call.recorded[layer_key] = (k.gather(1, index), v.gather(1, index))
        return layer.program(q, k, v, kernel, plan.ref_kernel(heads), base, plan.balance_recorder(stage, h, w),
                             ref_k=layer.ref_k, ref_v=layer.ref_v)

    return attn1_replace


def apply_plan(model, plan: RowPlan, dit_window: tuple[float, float] = (0.0, 1.0)):
    """A clone of `model` whose self-attention follows `plan`; `model` itself is left untouched.
    `dit_window`: on a diffusion transformer, the [start, end) fraction of its depth that is patched
    (see apply_dit_plan); a UNet ignores it."""
    if families.is_dit(model):
        return apply_dit_plan(model, plan, dit_window)
    layers = self_attention_layers(model)
    patched = model.clone()
    key = _call_key(patched)
    existing = patched.model_options["transformer_options"].get("patches_replace", {}).get("attn1", {})
    done = set()
    for stage, block_id, index in layers:
        if (stage, block_id, index) in existing:
            patched.set_model_attn1_replace(make_replace(plan, existing[(stage, block_id, index)], key),
                                            stage, block_id, index)
        elif (stage, block_id) not in done:
            patched.set_model_attn1_replace(make_replace(plan, existing.get((stage, block_id)), key), stage, block_id)
            done.add((stage, block_id))

    def resolve(call: ModelCall):
        for layer_key, level in layers.items():
            call.layer(layer_key, layer_key[0], _grid(call.latent_hw, level), 2 ** level)

    _install(patched, plan, key, resolve)
    return patched


# ---------------------------------------------------------------- torch.compile (see the module docstring)

COMPILE_NAME = "harmonizing_attention"
RECOMPILE_LIMIT = 64  # layouts per compiled copy (a few per model, image size, batch and mode) before Dynamo runs eagerly
_GUARDED = ("['patches_replace']", "['optimized_attention_override']", f"['{CALL_KEY}")  # the pack's state
_copies: dict = {}  # compile settings -> (the compiled _run, its guard filter)
_compilations = [0]  # Dynamo compilations of the pack's compiled copies in this process


def compilations() -> int:
    """How many times Dynamo compiled (a frame of) one of the pack's compiled copies in this process."""
    return _compilations[0]


def _run(module, *args, **kwargs):
    """The frame the pack compiles: a call of `module`, an input, so one compiled copy serves every module compiled
    with the same settings (Dynamo guards on the module's structure; its weights are graph inputs) and holds none."""
    return module(*args, **kwargs)


def _guard_filter(theirs):
    """Keep what the user's guard filter keeps (all without one) and every guard on the pack's state. Dynamo calls
    it once per compilation: the count compilations() reports."""

    def keep(entries):
        _compilations[0] += 1
        kept = [True] * len(entries) if theirs is None else list(theirs(entries))
        return [k or any(name in entry.name for name in _GUARDED) for entry, k in zip(entries, kept, strict=True)]

    return keep


def _compiled_copy(settings: dict, theirs) -> tuple:
    """(torch.compile'd _run, its guard filter) for the user's compile settings and guard filter, made once."""
    backend, mode = settings.get("backend", "inductor"), settings.get("mode")
    options = {k: v for k, v in (settings.get("options") or {}).items() if k != "guard_filter_fn"}
    key = (str(backend), mode, settings.get("fullgraph", False), settings.get("dynamic"), repr(sorted(options.items())),
           theirs)
    if key in _copies:
        return _copies[key]
    accepted = inspect.signature(torch.compile).parameters
    # its own recompile budget: the user's compiled model keeps Dynamo's default one for its own layouts
    extra = {"isolate_recompiles": True, "recompile_limit": RECOMPILE_LIMIT} if "isolate_recompiles" in accepted else {}
    if backend == "inductor":
        if mode not in (None, "default"):  # torch.compile takes a mode or options, and the guard filter is an option
            from torch._inductor import list_mode_options

            options = {**list_mode_options(mode, settings.get("dynamic")), **options}
            mode = None
        if "name" not in accepted:
            raise UnsupportedModel(f"TorchCompileModel in front of Harmonizing Attention needs a PyTorch whose "
                                   f"torch.compile takes name= (this is {torch.__version__}): update PyTorch, or remove "
                                   "TorchCompileModel")
        extra["name"] = COMPILE_NAME  # an inductor backend equal to the user's would share its compiled code
    else:
        if mode not in (None, "default"):
            raise UnsupportedModel(f"a torch.compile wrapper with backend {backend!r} and mode {mode!r}: the pack "
                                   "compiles its patched model with a guard filter of its own, which torch.compile "
                                   "takes with a mode only for inductor. Use TorchCompileModel (inductor), or remove it")
        from torch._dynamo.backends.registry import lookup_backend

        backend = functools.partial(lookup_backend(backend))  # a backend of its own (Dynamo compares backends)
    keep = options["guard_filter_fn"] = _guard_filter(theirs)
    run = torch.compile(_run, backend=backend, mode=mode, options=options, fullgraph=settings.get("fullgraph", False),
                        dynamic=settings.get("dynamic"), **extra)
    _copies[key] = (run, keep)
    return _copies[key]


class _Compiled(torch.nn.Module):
    """What the torch.compile wrapper swaps in for a module of the patched clone during a model call: the pack's
    compiled copy run on that module, which it refers to weakly (the host keeps it alive while it is swapped out).
    Attributes the host reads meanwhile (dtype, ...) are the module's."""

    def __init__(self, module, copy: tuple):
        super().__init__()
        object.__setattr__(self, "_target", weakref.ref(module))
        object.__setattr__(self, "copy", copy)  # (compiled _run, guard filter)

    def forward(self, *args, **kwargs):
        return self.copy[0](self._target(), *args, **kwargs)

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_target")(), name)


def _report_compilations(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: logs the compilations a sampling pass of the patched model caused."""
    before = _compilations[0]
    try:
        return executor(*args, **kwargs)
    finally:
        logging.info("Harmonizing Attention: torch.compile compiled the patched model %d time(s) in this sampling pass "
                     "(%d in this session): once per new layout (model, image size, batch, cfg, a changed region's "
                     "token count), none on a re-run with the same layout", _compilations[0] - before, _compilations[0])


def _compile_for_pack(patched) -> None:
    """Where a torch.compile wrapper (ComfyUI's TorchCompileModel) is on the model, run the pack's compiled copy of
    its modules instead (on this clone only): see the module docstring."""
    wrappers = patched.get_wrappers(WrappersMP.APPLY_MODEL, COMPILE_KEY)
    if not wrappers:
        return
    settings = patched.model_options.get(TORCH_COMPILE_KWARGS)
    modules = {}
    for wrapper in wrappers:
        try:
            found = inspect.getclosurevars(wrapper).nonlocals.get("compiled_module_dict")
        except TypeError:
            found = None
        if settings is None or not isinstance(found, dict):
            raise UnsupportedModel(
                "the MODEL has a torch.compile wrapper the pack does not know (not ComfyUI's TorchCompileModel): its "
                "compiled code could run without the pack's attention. Use ComfyUI's TorchCompileModel, or remove it")
        modules.update(found)
    ours = {}
    for name, module in modules.items():
        hooks = getattr(getattr(module, "dynamo_ctx", None), "_hooks", None)  # where torch keeps the user's guard filter
        ours[name] = _Compiled(getattr(module, "_orig_mod", module),
                               _compiled_copy(settings, getattr(hooks, "guard_filter_fn", None)))
    patched.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, COMPILE_KEY)
    patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, COMPILE_KEY, apply_torch_compile_factory(ours))
    patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _report_compilations)


# ---------------------------------------------------------------- diffusion transformers

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


def _block_replace(block: DitBlock, previous, key: str):
    def replace(args, extra):
        options = dict(args.get("transformer_options") or {})
        call = options.get(key)
        if call is not None and args.get("txt") is not None:
            call.txt = args["txt"].shape[1]
        options[BLOCK_KEY] = block
        args = {**args, "transformer_options": options}
        return previous(args, extra) if previous is not None else extra["original_block"](args)

    return replace


def _split(dit: _Dit, call: ModelCall, tokens: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(image span in the sequence, token grid (h, w)): the latent patchified p x p (padded up) gives
    h * w image tokens, after the block's text ([text; image; other]) or alone (image-only attention)."""
    h, w = families.token_grid(call.latent_hw, dit.patch)
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


def _override(dit: _Dit, key: str):
    plan = dit.plan

    def override(func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        block, call = dit.block_of(options), options.get(key)

        def host(*a, **kw):
            return dit.previous(func, *a, **kw) if dit.previous is not None else func(*a, **kw)

        if block is None or call is None:
            return host(*args, **kwargs)
        q, k, v = args[:3]
        heads = args[3] if len(args) > 3 else kwargs["heads"]
        rest = {name: val for name, val in kwargs.items() if name != "heads"}
        # [B, heads, N, d] (Flux: skip_reshape) or [B, N, heads * d] (SD3; its v comes as [B, N, heads, d]),
        # as [B, N, heads, d] views
        if rest.get("skip_reshape", False):
            q4, k4, v4 = (t.transpose(1, 2) for t in (q, k, v))
        else:
            q4, k4, v4 = (t.reshape(t.shape[0], t.shape[1], heads, -1) for t in (q, k, v))
        batch, tokens = q4.shape[:2]
        call.check(batch, "joint attention")
        image, (h, w) = _split(dit, call, tokens)
        layer = call.layers[(block.kind, block.index)]
        if layer.program is None:
            raise call.missing((block.kind, block.index))
        if layer.record is not None:  # [batch, longest region, heads, d]: each row's region tokens first
            index = layer.record[0][:, :, None, None].expand(-1, -1, *k4.shape[2:])
            call.recorded[(block.kind, block.index)] = tuple(t[:, image[0]:image[1]].gather(1, index) for t in (k4, v4))
        if not layer.program.effective:
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
        out = layer.program(q4, k4, v4, kernel, ref_kernel, base, plan.balance_recorder("output", h, w), image=image,
                            ref_k=layer.ref_k, ref_v=layer.ref_v)
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
    key = _call_key(patched)
    to = patched.model_options["transformer_options"]
    dit = _Dit(plan, families.patch_size(model), previous=to.get("optimized_attention_override"))
    if family.named_blocks is None:
        existing = to.get("patches_replace", {}).get("dit", {})
        for block_key, block in placed.items():
            patched.set_model_patch_replace(_block_replace(block, existing.get(block_key), key), "dit", *block_key)
    else:
        dit.block_of = _named_block(family.named_blocks, {block.index: block for block in placed.values()})
    # set_model_patch_replace copied transformer_options: set the override on the clone's current dict
    patched.model_options["transformer_options"]["optimized_attention_override"] = _override(dit, key)

    def resolve(call: ModelCall):  # every block: one Program (RowPlan.program's cache), its own recorded rows
        grid = families.token_grid(call.latent_hw, dit.patch)
        for block_key in placed:
            call.layer(block_key, "output", grid, 1, joint=True)

    _install(patched, plan, key, resolve, functools.partial(family.text_tokens, model.get_model_object("diffusion_model")))
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
