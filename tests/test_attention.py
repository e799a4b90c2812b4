"""Texture-aligning and Geometry-preserving Attention against a naive reference, and identities."""
import copy

import pytest
import torch

from harmonizing_attention.attention.kv import reference_attention, shared_attention
from harmonizing_attention.attention.roles import (
    Layer,
    PairLayout,
    RowPlan,
    geometry_preserving_rules,
    texture_aligning_rules,
)
from harmonizing_attention.attention.tokens import region_tokens

HEADS = 2


def sdpa_kernel(q, k, v):
    b, n, c = q.shape
    qh, kh, vh = (t.reshape(t.shape[0], t.shape[1], HEADS, -1).transpose(1, 2) for t in (q, k, v))
    return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(b, n, c)


def masked_reference(q, k_self, v_self, k_src, v_src, src_tokens, heads=HEADS):
    """softmax over [K_self; K_src] with the source keys outside the mask at -inf (eqs. 5-7 literally)."""
    d = q.shape[-1] // heads
    split = lambda t: t.reshape(t.shape[0], heads, d).transpose(0, 1).double()  # noqa: E731
    qh, k_cat, v_cat = split(q), split(torch.cat([k_self, k_src])), split(torch.cat([v_self, v_src]))
    logits = qh @ k_cat.transpose(-1, -2) / d ** 0.5
    keep = torch.cat([torch.ones(k_self.shape[0], dtype=torch.bool), src_tokens])
    logits[..., ~keep] = float("-inf")
    return (torch.softmax(logits, -1) @ v_cat).transpose(0, 1).reshape(q.shape[0], -1).float()


@pytest.mark.parametrize("hw", [(8, 8), (4, 4), (2, 2), (6, 10)])
def test_texture_aligning_equals_concatenated_reference(hw):
    torch.manual_seed(0)
    layout = PairLayout(sources=1, pairs=2)
    n = hw[0] * hw[1]
    q, k, v = (torch.randn(layout.inversion_rows, n, 16) for _ in range(3))
    out = shared_attention(q, k, v, texture_aligning_rules(layout), sdpa_kernel)
    for p in range(layout.pairs):
        geo, tar = layout.geo(p), layout.tar(p)
        expect = reference_attention(q[geo:geo + 1], torch.cat([k[geo], k[tar]])[None],
                                     torch.cat([v[geo], v[tar]])[None], HEADS)
        torch.testing.assert_close(out[geo:geo + 1], expect, rtol=1e-5, atol=1e-5)
    for row in [layout.src(0)] + [layout.tar(p) for p in range(layout.pairs)]:
        torch.testing.assert_close(out[row:row + 1], reference_attention(q[row:row + 1], k[row:row + 1],
                                                                          v[row:row + 1], HEADS), rtol=1e-5, atol=1e-5)


def test_texture_aligning_target_only_and_geometry_only():
    torch.manual_seed(1)
    layout = PairLayout(1, 1)
    q, k, v = (torch.randn(3, 16, 16) for _ in range(3))
    geo, tar = layout.geo(0), layout.tar(0)
    target_only = shared_attention(q, k, v, texture_aligning_rules(layout, "target_only"), sdpa_kernel)
    torch.testing.assert_close(target_only[geo:geo + 1],
                               reference_attention(q[geo:geo + 1], k[tar:tar + 1], v[tar:tar + 1], HEADS),
                               rtol=1e-5, atol=1e-5)
    plain = shared_attention(q, k, v, texture_aligning_rules(layout, "geometry_only"), sdpa_kernel)
    assert torch.equal(plain, sdpa_kernel(q, k, v))


@pytest.mark.parametrize("hw", [(8, 8), (4, 4), (2, 2)])
def test_geometry_preserving_gather_equals_masked_reference(hw):
    torch.manual_seed(2)
    layout = PairLayout(sources=1, pairs=2)
    h, w = hw
    mask = torch.zeros(layout.generation_rows, 32, 32)
    mask[0, 5:13, 18:29] = 1  # the source region
    plan = RowPlan(layout.generation_rows, lambda layer: geometry_preserving_rules(layout), regions=mask)
    tokens = {row: region_tokens(mask[row:row + 1], h, w)[0] for row in range(layout.generation_rows)}
    assert tokens[0].any() and not tokens[0].all()
    assert torch.equal(plan.region_tokens(h, w)[0], tokens[0].nonzero().squeeze(1))
    q, k, v = (torch.randn(layout.generation_rows, h * w, 16) for _ in range(3))
    out = shared_attention(q, k, v, plan.rules(Layer("output", 1)), sdpa_kernel, tokens)
    for p in range(layout.pairs):
        o = layout.out(p)
        expect = masked_reference(q[o], k[o], v[o], k[0], v[0], tokens[0])
        torch.testing.assert_close(out[o], expect, rtol=1e-5, atol=1e-5)
        source_only = shared_attention(q, k, v, geometry_preserving_rules(layout, "source_only"), sdpa_kernel, tokens)
        torch.testing.assert_close(source_only[o:o + 1], reference_attention(
            q[o:o + 1], k[0][tokens[0]][None], v[0][tokens[0]][None], HEADS), rtol=1e-5, atol=1e-5)
    # the source row reconstructs the source: plain self-attention
    torch.testing.assert_close(out[:1], reference_attention(q[:1], k[:1], v[:1], HEADS), rtol=1e-5, atol=1e-5)


def test_empty_source_region_is_exactly_plain():
    torch.manual_seed(3)
    layout = PairLayout(1, 1)
    q, k, v = (torch.randn(2, 16, 16) for _ in range(3))
    tokens = {0: torch.zeros(16, dtype=torch.bool), 1: torch.zeros(16, dtype=torch.bool)}
    out = shared_attention(q, k, v, geometry_preserving_rules(layout), sdpa_kernel, tokens)
    assert torch.equal(out, sdpa_kernel(q, k, v))


def test_region_tokens_keep_a_single_pixel_at_every_size():
    mask = torch.zeros(1, 16, 16)
    mask[0, 3, 9] = 1  # a single pixel
    for size in (16, 8, 4, 2, 1):
        tokens = region_tokens(mask, size, size)[0].reshape(size, size)
        assert tokens.sum() == 1 and tokens[3 * size // 16, 9 * size // 16]


# ---------------------------------------------------------------- on the real UNet, through ComfyUI's patch API

# each family's tiny UNet at a 16x16 latent: the layer sizes its self-attention runs at, and how many blocks
UNETS = {
    "tiny": ({(16, 16), (8, 8)}, 7),  # SD1.x
    "tiny-sd2v": ({(16, 16), (8, 8)}, 7),  # SD2.x v-prediction
    "tiny-sdxl": ({(8, 8), (4, 4)}, 70),  # SDXL: no self-attention at full size; depths 2 and 10
}


@pytest.fixture(params=list(UNETS))
def unet(request, tiny, families):
    """(model, context width, expected layer sizes, expected attn1 calls) of each family's tiny UNet."""
    import harness

    model, context_dim = harness.direct_unet(tiny[request.param][0])
    return (model, context_dim, *UNETS[request.param])


def _recorded_attn1_calls(model, x, context, transformer_options=None):
    """Run the UNet once, recording q, k, v and extra_options of every attn1 call (via a replace patch)."""
    from comfy.ldm.modules.attention import optimized_attention

    calls = []
    recorder = model.clone()

    def record(q, k, v, extra_options):
        calls.append((q.clone(), k.clone(), v.clone(), dict(extra_options)))
        return optimized_attention(q, k, v, extra_options["n_heads"])

    from harmonizing_attention.nodes.patch import self_attention_blocks

    for stage, block_id, index in self_attention_blocks(model):
        recorder.set_model_attn1_replace(record, stage, block_id, index)
    to = {**recorder.model_options["transformer_options"], **(transformer_options or {})}
    with torch.no_grad():
        recorder.model.apply_model(x, torch.full((x.shape[0],), 500.0), c_crossattn=context, transformer_options=to)
    return calls


def source_box(rows: int) -> torch.Tensor:
    """[rows, 128, 128] region masks: a 50 x 36 px box on row 0 (the source), empty elsewhere."""
    mask = torch.zeros(rows, 128, 128)
    mask[0, 20:70, 64:100] = 1
    return mask


def test_patch_equals_reference_at_every_block_resolution(unet):
    from harmonizing_attention.nodes.patch import make_replace

    model, context_dim, sizes, blocks = unet
    layout = PairLayout(1, 1)
    torch.manual_seed(4)
    x = torch.randn(layout.generation_rows, 4, 16, 16)
    context = torch.randn(layout.generation_rows, 77, context_dim)
    mask = source_box(layout.generation_rows)
    plan = RowPlan(layout.generation_rows, lambda layer: geometry_preserving_rules(layout), regions=mask)
    calls = _recorded_attn1_calls(model, x, context)
    assert {tuple(extra["activations_shape"][-2:]) for *_, extra in calls} == sizes
    assert len(calls) == blocks
    replace = make_replace(plan)
    for q, k, v, extra in calls:
        h, w = extra["activations_shape"][-2:]
        src_tokens = region_tokens(mask[:1], h, w)[0]
        out = replace(q, k, v, extra)
        expect = masked_reference(q[1], k[1], v[1], k[0], v[0], src_tokens, extra["n_heads"])
        torch.testing.assert_close(out[1], expect, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[:1], reference_attention(q[:1], k[:1], v[:1], extra["n_heads"]),
                                   rtol=1e-4, atol=1e-5)  # the source row: plain self-attention


def test_cond_uncond_chunks_map_rows_to_roles(unet):
    """With cond and uncond batched ([uncond rows, cond rows]), each chunk follows the plan on its own."""
    from harmonizing_attention.nodes.patch import make_replace

    model, context_dim, *_ = unet
    layout = PairLayout(1, 1)
    torch.manual_seed(5)
    x = torch.randn(2 * layout.inversion_rows, 4, 8, 8)
    context = torch.randn(2 * layout.inversion_rows, 77, context_dim)
    calls = _recorded_attn1_calls(model, x, context, {"cond_or_uncond": [1, 0]})
    replace = make_replace(RowPlan(layout.inversion_rows, lambda layer: texture_aligning_rules(layout)))
    rows = layout.inversion_rows
    for q, k, v, extra in calls:
        both = replace(q, k, v, extra)
        for c in range(2):
            sl = slice(c * rows, (c + 1) * rows)
            alone = replace(q[sl], k[sl], v[sl], {**extra, "cond_or_uncond": [0]})
            torch.testing.assert_close(both[sl], alone, rtol=1e-5, atol=1e-6)
    bad = {**calls[0][3], "cond_or_uncond": [0]}
    with pytest.raises(RuntimeError, match="expected 3 latent rows"):
        replace(*calls[0][:3], {**bad, "cond_or_uncond": [1, 0, 0, 0]})


def test_patch_resolves_each_layout_once(unet, monkeypatch):
    """Rules are resolved (index tensors, groups, biases) once per layout, i.e. per layer resolution and
    cond/uncond chunking: not at every layer call or every step. A second batch with the same layout and other
    values makes no new Program and gives what a freshly resolved plan gives."""
    from harmonizing_attention.attention import kv
    from harmonizing_attention.nodes.patch import apply_plan

    model, context_dim, sizes, blocks = unet
    layout = PairLayout(1, 1)
    mask = source_box(layout.generation_rows)
    built = []
    original = kv.Program.__init__

    def counting(self, *args, **kwargs):
        built.append(args[2])  # tokens per row: one Program per layer resolution
        original(self, *args, **kwargs)

    monkeypatch.setattr(kv.Program, "__init__", counting)
    plan = RowPlan(layout.generation_rows, lambda layer: geometry_preserving_rules(layout), regions=mask)
    patched = apply_plan(model, plan)
    torch.manual_seed(7)
    outs = []
    for step in range(3):
        x = torch.randn(2 * layout.generation_rows, 4, 16, 16)
        context = torch.randn(2 * layout.generation_rows, 77, context_dim)
        to = {**patched.model_options["transformer_options"], "cond_or_uncond": [1, 0]}
        with torch.no_grad():
            outs.append(patched.model.apply_model(x, torch.full((x.shape[0],), 900.0 - 300 * step),
                                                  c_crossattn=context, transformer_options=to))
    assert sorted(built) == sorted(h * w for h, w in sizes)  # one per resolution, over 3 steps x all blocks
    fresh = apply_plan(model, RowPlan(layout.generation_rows, lambda layer: geometry_preserving_rules(layout),
                                      regions=mask))
    with torch.no_grad():
        again = fresh.model.apply_model(x, torch.full((x.shape[0],), 300.0), c_crossattn=context,
                                        transformer_options={**fresh.model_options["transformer_options"],
                                                             "cond_or_uncond": [1, 0]})
    assert torch.equal(again, outs[-1])


def _unet_out(model, x, context):
    to = dict(model.model_options["transformer_options"])  # the UNet writes into it, as in sampling
    with torch.no_grad():
        return model.model.apply_model(x, torch.full((x.shape[0],), 500.0), c_crossattn=context, transformer_options=to)


def test_identity_modes_give_exactly_the_unpatched_model(unet):
    from harmonizing_attention.nodes.patch import apply_plan

    model, context_dim, *_ = unet
    layout = PairLayout(1, 1)
    torch.manual_seed(6)
    x = torch.randn(layout.generation_rows, 4, 16, 16)
    context = torch.randn(1, 77, context_dim).expand(layout.generation_rows, -1, -1)
    options_before = copy.deepcopy(model.model_options)
    plain = _unet_out(model, x, context)
    empty = torch.zeros(layout.generation_rows, 128, 128)
    for plan in (
        RowPlan(layout.generation_rows, lambda layer: geometry_preserving_rules(layout), regions=empty),
        RowPlan(layout.generation_rows, lambda layer: geometry_preserving_rules(layout, "self_only")),
    ):
        assert torch.equal(_unet_out(apply_plan(model, plan), x, context), plain)
    some = empty.clone()
    some[0, 10:50, 10:50] = 1
    changed = _unet_out(apply_plan(model, RowPlan(2, lambda layer: geometry_preserving_rules(layout), regions=some)),
                        x, context)
    assert torch.equal(changed[0], plain[0]) and not torch.allclose(changed[1], plain[1])
    assert model.model_options == options_before  # the input MODEL is untouched


def test_chains_with_an_existing_replace_patch(unet):
    """A replace patch already on every block keeps running on the whole batch; our rows are redone."""
    from comfy.ldm.modules.attention import optimized_attention

    from harmonizing_attention.nodes.patch import apply_plan, self_attention_blocks

    model, context_dim, *_ = unet
    seen = []

    def other(q, k, v, extra_options):
        seen.append(q.shape[0])
        return optimized_attention(q, k, v * 2, extra_options["n_heads"])  # a visible effect: doubled values

    other_model = model.clone()
    blocks = self_attention_blocks(model)
    for stage, block_id, index in blocks:
        other_model.set_model_attn1_replace(other, stage, block_id, index)
    layout = PairLayout(1, 1)
    torch.manual_seed(7)
    x = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 77, context_dim)
    self_only = RowPlan(2, lambda layer: geometry_preserving_rules(layout, "self_only"))
    assert torch.equal(_unet_out(apply_plan(other_model, self_only), x, context), _unet_out(other_model, x, context))
    assert seen and set(seen) == {2}
    mask = torch.ones(2, 64, 64)
    ours = _unet_out(apply_plan(other_model, RowPlan(2, lambda layer: geometry_preserving_rules(layout), regions=mask)),
                     x, context)
    base = _unet_out(other_model, x, context)
    assert torch.equal(ours[0], base[0])  # the source row: the other patch's result, untouched
    assert not torch.allclose(ours[1], base[1])
    registered = apply_plan(other_model, self_only).model_options["transformer_options"]["patches_replace"]["attn1"]
    assert set(registered) == set(blocks)  # wrapped in place: no second key shadows or is shadowed
