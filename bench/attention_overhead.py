"""Cost of the patched self-attention: one patched UNet forward / the plain forward of the same batch.

Modes (each on its own batch, rows named as the pipeline lays them out):
- texture_aligning    (inversion batch src, tar, geo):  geo -> [geo; tar]           (eq. 3)
- geometry_preserving (generation batch src, out):      out -> [out; src in M_src]  (eq. 5)
- cross_image         (app, struct, out):               out -> [app] on decoder layers (built on the
  core directly: a RowPlan, not nodes/appearance.py)

Plain and patched forwards of the same inputs run interleaved in one process; the ratio is taken per
round. Concatenated keys are extra work by construction (texture-aligning's geo row attends to 2N
keys), so the table also gives the FLOP ratio of an ideal implementation of the same rule
(`ideal`: model FLOPs with the longer key sets / plain model FLOPs) and time ratio / ideal
(`vs ideal`): what the gather/concat/extra kernel calls cost beyond the arithmetic.

FLOPs are not time where the attention kernel runs at another rate than the rest of the model (the tiny
UNet's heads of 16 channels: self-attention is ~1/3 of its FLOPs but ~2/3 of its CPU time). So the table also
gives the ideal at the kernel's measured rate: `rate ideal` = 1 + (patched / plain self-attention FLOPs - 1) x
the share of the plain forward's time that the host's kernel spends in self-attention (its calls captured in
one plain forward and replayed through the same kernel, timed in the same rounds: self_attention_replay). That is the time an
implementation would take whose only extra cost is the extra keys' arithmetic, done by the host's kernel at the
rate it does the plain self-attention; `median / rate ideal` is then the patch's own cost (gathers, copies,
extra kernel calls, Python).

On a diffusion transformer (--models flux-tiny, flux, sd35m) every block is a joint attention over text and
image tokens; each row keeps its text, so the ideal counts the text keys too (see dit_ideal_ratio).

    python bench/attention_overhead.py [--quick] [--cpu] [--models tiny,sd15,flux,sd35m] [--sizes 32,64,96] [--clock cpu]
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODES = ("texture_aligning", "geometry_preserving", "cross_image")


def box_masks(rows: int, pixels: int, fraction: float = 0.5):
    """[rows, H, W] masks: a centred square of side fraction * H (a quarter of the image at 0.5)."""
    import torch

    m = torch.zeros(rows, pixels, pixels)
    a = int(round(pixels * (1 - fraction) / 2))
    m[:, a:pixels - a, a:pixels - a] = 1.0
    return m


def plan_for(mode: str, size: int):
    """(rows, RowPlan) of a mode at a latent size (masks at 8x: pixel size)."""
    from harmonizing_attention.attention.kv import Ref
    from harmonizing_attention.attention.roles import (
        PairLayout,
        RowPlan,
        geometry_preserving_rules,
        texture_aligning_rules,
    )

    layout = PairLayout(1, 1)
    if mode == "texture_aligning":
        rules = texture_aligning_rules(layout)
        return RowPlan(layout.inversion_rows, lambda layer: rules)
    if mode == "geometry_preserving":
        rules = geometry_preserving_rules(layout)
        return RowPlan(layout.generation_rows, lambda layer: rules, regions=box_masks(2, 8 * size))
    if mode == "cross_image":
        decoder = [None, None, (Ref(0),)]  # rows: app, struct, out
        return RowPlan(3, lambda layer: decoder if layer.stage == "output" else [None] * 3)
    raise ValueError(mode)


def attention_layers(patcher, forward):
    """[(stage, h, w, inner_dim, context_tokens)] of every transformer block, from one plain forward."""
    from comfy.ldm.modules.attention import SpatialTransformer

    unet = patcher.model.diffusion_model
    seen, handles = [], []
    stages = (("input", unet.input_blocks), ("middle", [unet.middle_block]), ("output", unet.output_blocks))
    for stage, blocks in stages:
        for block in blocks:
            for layer in block:
                if isinstance(layer, SpatialTransformer):
                    inner = layer.transformer_blocks[0].attn1.to_q.out_features
                    depth = len(layer.transformer_blocks)

                    def hook(mod, args, kwargs, out, stage=stage, inner=inner, depth=depth):
                        x = args[0]
                        seen.extend([(stage, x.shape[-2], x.shape[-1], inner)] * depth)

                    handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        forward(patcher)
    finally:
        for h in handles:
            h.remove()
    return seen


def other_flops(patcher, forward) -> float:
    """FLOPs of one forward outside attention kernels (torch's counter; attention is added analytically,
    since the counter does not see every SDPA backend, e.g. the CPU's)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        forward(patcher)
    total = 0
    for op, n in counter.get_flop_counts().get("Global", {}).items():
        if "scaled_dot_product" not in str(op):
            total += n
    return float(total)


def attention_flops(plan, patcher, forward, size: int, rows: int) -> tuple[float, float, float]:
    """(self-attention FLOPs of one plain forward, the same with the plan's key sets, other attention FLOPs (a
    UNet's cross-attention, the same in both)): 4 x queries x keys x width per call. A UNet's layers come from one
    plain forward; a diffusion transformer's every block is a joint attention over L = text + image tokens (the
    latent patchified 2x2), where each row attends to its rule's keys (text included: kv._joint)."""
    import torch
    from harmonizing_attention.attention.roles import Layer
    from harmonizing_attention.nodes.families import dit_blocks, is_dit

    cpu = torch.device("cpu")
    if is_dit(patcher):
        inner = patcher.model.diffusion_model.hidden_size
        h = w = -(-size // 2)
        n, text = h * w, forward.context.shape[1]
        tokens = text + n
        program = plan.program(Layer(stage="output", downscale=1), h, w, 1, cpu, joint=True)
        blocks = len(dit_blocks(patcher))
        return (blocks * 4.0 * tokens * tokens * inner * rows,
                blocks * 4.0 * tokens * program.keys(tokens, (text, text + n)) * inner, 0.0)
    plain = patched = cross = 0.0
    for stage, h, w, inner in attention_layers(patcher, forward):
        n = h * w
        program = plan.program(Layer(stage=stage, downscale=max(1, round(size / w))), h, w, 1, cpu)
        plain += 4.0 * n * n * inner * rows
        patched += 4.0 * n * program.keys(n) * inner
        cross += 4.0 * n * 77 * inner * rows
    return plain, patched, cross


def self_attention_replay(patcher, forward):
    """A function that makes the host's attention kernel calls of one plain forward's self-attention (a DiT: joint
    attention) again: they are captured once (their inputs, through an attn1 replace or an
    optimized_attention_override on a clone) and replayed through the same kernel."""
    import torch
    from comfy.ldm.modules.attention import optimized_attention
    from harmonizing_attention.nodes.families import is_dit
    from harmonizing_attention.nodes.patch import self_attention_blocks

    calls = []
    probe = patcher.clone()
    if is_dit(patcher):
        def capture(func, *args, **kwargs):
            calls.append(lambda: func(*args, **kwargs))
            return func(*args, **kwargs)

        probe.model_options["transformer_options"]["optimized_attention_override"] = capture
    else:
        def capture(q, k, v, extra):
            def call():
                return optimized_attention(q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"),
                                           transformer_options=extra)
            calls.append(call)
            return call()

        for stage, block_id, index in self_attention_blocks(patcher):
            probe.set_model_attn1_replace(capture, stage, block_id, index)
    forward(probe)

    def replay():
        with torch.inference_mode():
            for call in calls:
                call()

    return replay


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default=None, help="latent sizes, comma-separated (default 32,64,96; --quick: 32)")
    p.add_argument("--modes", default=",".join(MODES))
    common.add_clock(p)
    args = p.parse_args(argv)
    device = common.start(args.cpu, args.threads, args.clock)
    from harmonizing_attention.nodes.patch import apply_plan

    sizes = [int(s) for s in (args.sizes or ("32" if args.quick else "32,64,96")).split(",")]
    repeats = args.repeats or (3 if args.quick else 7)
    modes = args.modes.split(",")
    rows_out, all_ratios = [], []
    print(f"# attention overhead on {common.describe(device)}; {repeats} interleaved rounds per cell", flush=True)
    for model_name in common.models_arg(args):
        plain_model = common.build_model(model_name, device)
        for size in sizes:
            other = None
            for mode in modes:
                plan = plan_for(mode, size)
                patched_model = apply_plan(plain_model, plan)
                forward = common.Forward(plain_model, plan.rows, size, device)
                if other is None:  # non-attention FLOPs scale with the batch: count one row once
                    other = other_flops(plain_model, common.Forward(plain_model, 1, size, device))
                plain_self, patched_self, cross = attention_flops(plan, plain_model, forward, size, plan.rows)
                rest = other * plan.rows + cross
                ideal = (rest + patched_self) / (rest + plain_self)
                times = common.interleaved({"plain": lambda f=forward, m=plain_model: f(m),
                                            "patched": lambda f=forward, m=patched_model: f(m),
                                            "kernel": self_attention_replay(plain_model, forward)}, repeats, device)
                share = statistics.median(common.ratios(times["kernel"], times["plain"]))
                rate = 1 + (patched_self / plain_self - 1) * share
                r = common.ratios(times["patched"], times["plain"])
                all_ratios += [x / ideal for x in r]
                rows_out.append([model_name, f"{size}x{size}", mode, plan.rows,
                                 f"{statistics.median(times['plain']) * 1e3:.1f}", common.mmm(r),
                                 f"{ideal:.3f}", f"{statistics.median(r) / ideal:.3f}",
                                 f"{share:.2f}", f"{rate:.3f}", f"{statistics.median(r) / rate:.3f}"])
                print(f"  {model_name} {size}x{size} {mode}: ratio {common.mmm(r)} ideal {ideal:.3f} "
                      f"self-attention share {share:.2f} rate ideal {rate:.3f}", flush=True)
            del other
        del plain_model
    print()
    print(common.table(["model", "latent", "mode", "rows", "plain ms (median)", "patched/plain min / med / max",
                        "ideal (FLOPs)", "median / ideal", "self-attention share of plain time",
                        "ideal (kernel rate)", "median / rate ideal"], rows_out))
    worst = max(float(row[7]) for row in rows_out)
    worst_rate = max(float(row[-1]) for row in rows_out)
    raw = max(float(row[5].split(" / ")[1]) for row in rows_out)
    print(f"\nworst median over cells of patched/plain divided by the ideal FLOP ratio; "
          f"spread of all per-round ratios/ideal: {common.mmm(all_ratios)}; clock: {args.clock}")
    print(f"attention_overhead_vs_ideal_worst={worst:.3f} attention_overhead_vs_rate_ideal_worst={worst_rate:.3f} "
          f"attention_overhead_raw_worst={raw:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
