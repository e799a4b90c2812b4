"""Balance of reference and self tokens (kv.Balance): log(w) on the reference keys' logits, through the
host's kernel, against a float64 reference with biased logits; w = 1 is the paper bit for bit; auto makes
the reference share independent of the region's size."""
import math

import pytest
import torch

from harmonizing_attention.attention import kv
from harmonizing_attention.attention.kv import AUTO_AREA, Balance, Ref, reference_attention, shared_attention
from harmonizing_attention.attention.roles import (
    Layer,
    PairLayout,
    RowPlan,
    balance,
    geometry_preserving_rules,
    texture_aligning_rules,
)
from harmonizing_attention.attention.tokens import region_tokens
from test_attention import HEADS, _recorded_attn1_calls, source_box, unet  # noqa: F401  (unet: the per-family fixture)


def sdpa_kernel(q, k, v, mask=None):
    b, n, c = q.shape
    qh, kh, vh = (t.reshape(t.shape[0], t.shape[1], HEADS, -1).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, n, c)


def biased_reference(q, groups, heads=HEADS):
    """softmax(q [K_1; K_2; ...]^T / sqrt(d) + [log w_1; log w_2; ...]) [V_1; V_2; ...] in float64.
    q [N, C]; groups: [(k [n_i, C], v [n_i, C], w_i)]."""
    keys = torch.cat([g[0] for g in groups])[None]
    values = torch.cat([g[1] for g in groups])[None]
    bias = torch.cat([torch.full((g[0].shape[0],), math.log(g[2]), dtype=torch.float64) for g in groups])
    return reference_attention(q[None].double(), keys.double(), values.double(), heads, bias)[0]


def auto_weight(n_ref, n_row):
    return AUTO_AREA * n_row / n_ref


# ---------------------------------------------------------------- the math, on plain tensors


@pytest.mark.parametrize("hw", [(8, 8), (4, 4), (6, 10)])
@pytest.mark.parametrize("mode", ["manual", "auto"])
def test_geometry_preserving_balance_equals_biased_reference(hw, mode):
    torch.manual_seed(10)
    h, w = hw
    layout = PairLayout(sources=1, pairs=2)
    mask = torch.zeros(layout.generation_rows, 32, 32)
    mask[0, 5:13, 18:29] = 1
    tokens = {row: region_tokens(mask[row:row + 1], h, w)[0] for row in range(layout.generation_rows)}
    n_ref = int(tokens[0].sum())
    q, k, v = (torch.randn(layout.generation_rows, h * w, 16) for _ in range(3))
    rules = geometry_preserving_rules(layout, balance=balance(mode, 3.0))
    out = shared_attention(q, k, v, rules, sdpa_kernel, tokens)
    weight = 3.0 if mode == "manual" else 3.0 * auto_weight(n_ref, h * w)
    for p in range(layout.pairs):
        o = layout.out(p)
        expect = biased_reference(q[o], [(k[o], v[o], 1.0), (k[0][tokens[0]], v[0][tokens[0]], weight)])
        torch.testing.assert_close(out[o].double(), expect, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:1], sdpa_kernel(q[:1], k[:1], v[:1]))  # the source row: untouched


@pytest.mark.parametrize("mode, weight", [("manual", 0.25), ("auto", 2.0)])
def test_texture_aligning_balance_equals_biased_reference(mode, weight):
    torch.manual_seed(11)
    layout = PairLayout(sources=1, pairs=1)
    q, k, v = (torch.randn(layout.inversion_rows, 48, 16) for _ in range(3))
    out = shared_attention(q, k, v, texture_aligning_rules(layout, balance=balance(mode, weight)), sdpa_kernel)
    geo, tar = layout.geo(0), layout.tar(0)
    # auto on eq. 3: the reference is the whole target row, its canonical size, so w = weight x 1
    expect = biased_reference(q[geo], [(k[geo], v[geo], 1.0), (k[tar], v[tar], weight)])
    torch.testing.assert_close(out[geo].double(), expect, rtol=1e-5, atol=1e-5)


def test_query_chunks_with_a_bias_equal_one_call(monkeypatch):
    """The biased kernel runs in chunks of BIAS_QUERY_CHUNK queries (bounding a kernel that expands the bias
    to [rows, 1, queries, keys]); chunks give the same result."""
    torch.manual_seed(12)
    layout = PairLayout(1, 1)
    tokens = {0: torch.arange(64) < 20, 1: torch.zeros(64, dtype=torch.bool)}
    q, k, v = (torch.randn(2, 64, 16) for _ in range(3))
    rules = geometry_preserving_rules(layout, balance=balance("manual", 5.0))
    whole = shared_attention(q, k, v, rules, sdpa_kernel, tokens)
    calls = []

    def counting(q_, k_, v_, mask=None):
        calls.append((q_.shape[1], None if mask is None else tuple(mask.shape)))
        return sdpa_kernel(q_, k_, v_, mask)

    monkeypatch.setattr(kv, "BIAS_QUERY_CHUNK", 24)
    chunked = shared_attention(q, k, v, rules, counting, tokens)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    assert [c for c in calls if c[1] is not None] == [(24, (1, 1, 1, 84)), (24, (1, 1, 1, 84)), (16, (1, 1, 1, 84))]


def test_comfy_kernels_take_the_bias_as_a_broadcast_mask(comfy):
    """Every attention kernel ComfyUI can pick on this machine adds a [rows, 1, 1, keys] float mask to the logits
    (basic, split, sub-quadratic, PyTorch SDPA), equal to the float64 biased reference."""
    from comfy.ldm.modules import attention as comfy_attention

    torch.manual_seed(13)
    q, k, v = torch.randn(2, 40, 32), torch.randn(2, 56, 32), torch.randn(2, 56, 32)
    bias = torch.cat([torch.zeros(2, 30), torch.full((2, 26), math.log(4.0))], 1)
    bias[1, 30:] = math.log(0.3)
    expect = reference_attention(q, k, v, HEADS, bias[:, None, None])
    for name in ("attention_basic", "attention_split", "attention_sub_quad", "attention_pytorch"):
        fn = getattr(comfy_attention, name)
        torch.testing.assert_close(fn(q, k, v, HEADS, mask=bias[:, None, None]), expect, rtol=1e-5, atol=1e-5,
                                   msg=name)


# ---------------------------------------------------------------- w = 1 is the paper, bit for bit


def test_unit_weight_is_bit_identical_and_passes_no_mask():
    torch.manual_seed(14)
    layout = PairLayout(1, 2)
    mask = torch.zeros(3, 16, 16)
    mask[0, 2:9, 3:7] = 1
    tokens = {row: region_tokens(mask[row:row + 1], 8, 8)[0] for row in range(3)}
    q, k, v = (torch.randn(3, 64, 16) for _ in range(3))
    seen = []

    def spy(q_, k_, v_, **kwargs):
        seen.append(kwargs)
        return sdpa_kernel(q_, k_, v_)

    paper = shared_attention(q, k, v, geometry_preserving_rules(layout), spy, tokens)
    assert balance("paper", 7.0) is None and balance("manual", 1.0) is None
    assert geometry_preserving_rules(layout, balance=balance("manual", 1.0)) == geometry_preserving_rules(layout)
    explicit = [None, *((Ref(o, balance=Balance(1.0)), Ref(0, True, Balance(1.0))) for o in (1, 2))]
    assert torch.equal(shared_attention(q, k, v, explicit, spy, tokens), paper)
    assert seen and all(kwargs == {} for kwargs in seen)  # no mask argument reached the kernel


# ---------------------------------------------------------------- auto: the share does not follow the region's size


@pytest.mark.parametrize("weight", [1.0, 2.5])
def test_auto_share_is_the_same_for_a_region_of_1_and_40_percent(comfy, weight):
    """Equal keys (all logits equal) through ComfyUI's own kernel: values 0 on the output row, 1 on the source, so
    the output is the source's share. 20 x 20 tokens, regions of 4 (1%) and 160 (40%) tokens."""
    from comfy.ldm.modules.attention import optimized_attention

    def kernel(q_, k_, v_, **mask):
        return optimized_attention(q_, k_, v_, HEADS, **mask)

    layout = PairLayout(1, 1)
    n = 400
    shares = {}
    for mode in ("paper", "auto"):
        for fraction, count in ((0.01, 4), (0.40, 160)):
            region = torch.arange(n) < count
            q, k = torch.zeros(2, n, 16), torch.zeros(2, n, 16)
            v = torch.stack([torch.ones(n, 16), torch.zeros(n, 16)])  # row 0: source, row 1: output
            out = shared_attention(q, k, v, geometry_preserving_rules(layout, balance=balance(mode, weight)), kernel,
                                   {0: region, 1: torch.zeros(n, dtype=torch.bool)})
            assert torch.allclose(out[1], out[1, 0, 0].expand(n, 16))  # the same share at every query
            shares[mode, fraction] = float(out[1, 0, 0])
    expected = weight * AUTO_AREA / (1 + weight * AUTO_AREA)  # n_ref0 = AUTO_AREA * n
    assert shares["auto", 0.01] == pytest.approx(expected, rel=1e-5)
    assert shares["auto", 0.40] == pytest.approx(expected, rel=1e-5)
    assert shares["paper", 0.01] == pytest.approx(4 / 404, rel=1e-5)  # the paper's share follows the size
    assert shares["paper", 0.40] == pytest.approx(160 / 560, rel=1e-5)


# ---------------------------------------------------------------- every model family, through ComfyUI's patch API


@pytest.mark.parametrize("mode, weight", [("manual", 3.0), ("auto", 1.0)])
def test_balance_equals_biased_reference_on_every_family(unet, mode, weight):  # noqa: F811
    from harmonizing_attention.nodes.patch import make_replace

    model, context_dim, sizes, blocks = unet
    layout = PairLayout(1, 1)
    torch.manual_seed(15)
    x = torch.randn(layout.generation_rows, 4, 16, 16)
    context = torch.randn(layout.generation_rows, 77, context_dim)
    mask = source_box(layout.generation_rows)
    rules = geometry_preserving_rules(layout, balance=balance(mode, weight))
    plan = RowPlan(layout.generation_rows, lambda layer: rules, regions=mask, report_balance=True)
    calls = _recorded_attn1_calls(model, x, context)
    assert len(calls) == blocks
    replace = make_replace(plan)
    for q, k, v, extra in calls:
        h, w = extra["activations_shape"][-2:]
        src = region_tokens(mask[:1], h, w)[0]
        wt = weight if mode == "manual" else weight * auto_weight(int(src.sum()), h * w)
        out = replace(q, k, v, extra)
        expect = biased_reference(q[1], [(k[1], v[1], 1.0), (k[0][src], v[0][src], wt)], extra["n_heads"])
        torch.testing.assert_close(out[1].double(), expect, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[0].double(), reference_attention(q[:1], k[:1], v[:1], extra["n_heads"])[0].double(),
                                   rtol=1e-4, atol=1e-5)
    report = plan.balance_report()
    assert {line.split(" row")[0] for line in report} == {f"{s} {w}x{h}" for s, h, w in {
        (extra["block"][0], *extra["activations_shape"][-2:]) for *_, extra in calls}}
    if mode == "auto":  # every layer: the source's share is AUTO_AREA / (1 + AUTO_AREA) of equal logits
        assert all(line.endswith(f"({100 * AUTO_AREA / (1 + AUTO_AREA):.1f}%)") for line in report)


def test_balanced_plan_chunks_cond_and_uncond_like_one(unet):  # noqa: F811
    """cond and uncond batched: each chunk's balance is its own (rules shifted with their Balance)."""
    from harmonizing_attention.nodes.patch import make_replace

    model, context_dim, *_ = unet
    layout = PairLayout(1, 1)
    torch.manual_seed(16)
    x = torch.randn(2 * layout.generation_rows, 4, 8, 8)
    context = torch.randn(2 * layout.generation_rows, 77, context_dim)
    mask = torch.zeros(layout.generation_rows, 64, 64)
    mask[0, 8:30, 10:20] = 1
    calls = _recorded_attn1_calls(model, x, context, {"cond_or_uncond": [1, 0]})
    rules = geometry_preserving_rules(layout, balance=balance("auto", 2.0))
    replace = make_replace(RowPlan(layout.generation_rows, lambda layer: rules, regions=mask))
    rows = layout.generation_rows
    for q, k, v, extra in calls[:4]:
        both = replace(q, k, v, extra)
        for c in range(2):
            sl = slice(c * rows, (c + 1) * rows)
            torch.testing.assert_close(both[sl], replace(q[sl], k[sl], v[sl], {**extra, "cond_or_uncond": [0]}),
                                       rtol=1e-5, atol=1e-6)


def test_layer_argument_is_unused_by_balance():
    """Balance depends on token counts only: the same rules at every Layer."""
    layout = PairLayout(1, 1)
    rules = geometry_preserving_rules(layout, balance=balance("auto"))
    plan = RowPlan(2, lambda layer: rules)
    assert plan.rules(Layer("input", 1)) == plan.rules(Layer("output", 4))
    with pytest.raises(ValueError, match="balance mode 'strong'"):
        balance("strong")
    with pytest.raises(ValueError, match="balance weight must be > 0"):
        balance("manual", 0.0)
