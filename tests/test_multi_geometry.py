"""Several geometries onto one target in one inversion and one generation (HA_AddGeometry)."""
import math
from pathlib import Path

import pytest
import torch

import harness
from harmonizing_attention.attention import color, edit
from harmonizing_attention.attention.kv import AUTO_AREA, Ref, reference_attention
from harmonizing_attention.attention.roles import (
    PairLayout,
    RowPlan,
    balance,
    geometry_preserving_rules,
    texture_aligning_rules,
)
from harmonizing_attention.attention.tokens import region_tokens
from test_attention import _recorded_attn1_calls, unet  # noqa: F401  (unet: the per-family fixture)
from test_pipeline import graph


def box(size, y0, y1, x0, x1, batch=1):
    m = torch.zeros(batch, size, size)
    m[:, y0:y1, x0:x1] = 1
    return m


# ---------------------------------------------------------------- batch layout and rules


def test_layout_and_rules_of_two_geometries():
    layout = PairLayout(sources=2, pairs=1, geometries=2)
    assert (layout.inversion_rows, layout.generation_rows) == (4, 3)  # [src0, src1, tar, geo], [src0, src1, out]
    assert texture_aligning_rules(layout) == [None, None, None, (Ref(3), Ref(2))]  # eq. 3 unchanged
    assert geometry_preserving_rules(layout) == [None, None, (Ref(2), Ref(0, True), Ref(1, True))]
    assert geometry_preserving_rules(layout, "source_only")[2] == (Ref(0, True), Ref(1, True))
    per_pair = PairLayout(sources=4, pairs=2, geometries=2)  # pair-major: rows p * G + g
    assert [per_pair.sources_of(p) for p in range(2)] == [[0, 1], [2, 3]]
    assert geometry_preserving_rules(per_pair) == [None] * 4 + [(Ref(4), Ref(0, True), Ref(1, True)),
                                                               (Ref(5), Ref(2, True), Ref(3, True))]
    shared = PairLayout(sources=2, pairs=2, geometries=2)
    assert [shared.sources_of(p) for p in range(2)] == [[0, 1], [0, 1]]
    with pytest.raises(ValueError, match="3 source rows for 2 targets with 2 geometries"):
        PairLayout(3, 2, 2)


def test_one_geometry_rules_are_todays():
    """The rules of one geometry are literally the published ones (no balance field set, same tuples)."""
    for sources, pairs in ((1, 1), (1, 3), (3, 3)):
        layout = PairLayout(sources, pairs)
        for p in range(pairs):
            src = p if sources > 1 else 0
            assert geometry_preserving_rules(layout)[layout.out(p)] == (Ref(layout.out(p)), Ref(src, region_only=True))
            assert texture_aligning_rules(layout)[layout.geo(p)] == (Ref(layout.geo(p)), Ref(layout.tar(p)))


# ---------------------------------------------------------------- two geometries per layer, every family


@pytest.mark.parametrize("mode", ["paper", "auto"])
def test_two_geometries_equal_the_naive_reference_per_layer(unet, mode):  # noqa: F811
    """out -> [out; src0 in M0; src1 in M1] at every self-attention block, against float64 softmax over the
    concatenated keys (with the auto balance's log-weights per source where on)."""
    from harmonizing_attention.nodes.patch import make_replace

    model, context_dim, sizes, blocks = unet
    layout = PairLayout(2, 1, 2)
    torch.manual_seed(20)
    x = torch.randn(3, 4, 16, 16)
    context = torch.randn(3, 77, context_dim)
    masks = torch.stack([box(128, 10, 40, 70, 90)[0], box(128, 60, 120, 8, 100)[0],
                         torch.zeros(128, 128)])  # a small and a large source region; out's own mask unused
    rules = geometry_preserving_rules(layout, balance=balance(mode))
    replace = make_replace(RowPlan(3, lambda layer: rules, regions=masks))
    calls = _recorded_attn1_calls(model, x, context)
    assert len(calls) == blocks
    for q, k, v, extra in calls:
        h, w = extra["activations_shape"][-2:]
        heads = extra["n_heads"]
        t0, t1 = (region_tokens(masks[i:i + 1], h, w)[0] for i in (0, 1))
        keys = torch.cat([k[2], k[0][t0], k[1][t1]])[None]
        values = torch.cat([v[2], v[0][t0], v[1][t1]])[None]
        bias = None
        if mode == "auto":
            logw = [math.log(AUTO_AREA * h * w / int(t.sum())) for t in (t0, t1)]
            bias = torch.cat([torch.zeros(h * w), torch.full((int(t0.sum()),), logw[0]),
                              torch.full((int(t1.sum()),), logw[1])]).double()
        expect = reference_attention(q[2:3].double(), keys.double(), values.double(), heads, bias)
        out = replace(q, k, v, extra)
        torch.testing.assert_close(out[2:3].double(), expect, rtol=1e-4, atol=1e-5)
        for row in (0, 1):  # the sources: plain self-attention
            torch.testing.assert_close(out[row:row + 1], reference_attention(q[row:row + 1], k[row:row + 1],
                                                                              v[row:row + 1], heads),
                                       rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the scene: composite, order, colour


def _scene_of_two(comfy, pairs=1):
    from harmonizing_attention.nodes import pipeline
    from harmonizing_attention.nodes.geometry import GeometryImageEdit

    gen = torch.Generator().manual_seed(21)
    size = 48
    src_a, src_b = torch.rand(1, size, size, 3, generator=gen), torch.rand(1, size, size, 3, generator=gen)
    target = torch.rand(pairs, size, size, 3, generator=gen)
    mask_a, mask_b = box(size, 10, 22, 10, 22), box(size, 30, 40, 6, 30)
    scene = GeometryImageEdit.execute(src_a, mask_a, target, 0.0, 0.0, 1.0, 0.0).args[2]
    placement = edit.Placement(shift_x=4.0, shift_y=-16.0)  # b moves up onto a's lower right corner
    two = pipeline.add_geometry(scene, src_b, mask_b, placement)
    return scene, two, (src_a, mask_a, src_b, mask_b, target, placement)


def test_add_geometry_composites_in_order(comfy):
    scene, two, (src_a, mask_a, src_b, mask_b, target, placement) = _scene_of_two(comfy)
    placed_b, m_b = edit.place_source(src_b, mask_b, target, placement)
    assert two.geometries == 2 and two.layout == PairLayout(2, 1, 2)
    assert torch.equal(two.source, torch.cat([src_a, src_b])) and torch.equal(two.source_mask, torch.cat([mask_a, mask_b]))
    assert torch.equal(two.placed_masks, torch.stack([scene.geometry_mask, m_b], 1))
    assert torch.equal(two.geometry_mask, torch.maximum(scene.geometry_mask, m_b))
    overlap = (scene.geometry_mask > 0) & (m_b > 0)
    assert overlap.any()  # the placements do overlap: the later geometry wins there
    assert torch.equal(two.geometry[overlap], placed_b[overlap])
    only_a = (scene.geometry_mask > 0) & (m_b == 0)
    assert torch.equal(two.geometry[only_a], scene.geometry[only_a])
    outside = two.geometry_mask == 0
    assert torch.equal(two.geometry[outside], target[outside])
    (_, _, vis_a), (_, _, vis_b) = two.parts()
    assert torch.equal(vis_b, m_b) and torch.equal(vis_a, scene.geometry_mask * (1 - m_b))


def test_add_geometry_with_several_targets_and_per_pair_sources(comfy):
    from harmonizing_attention.nodes import pipeline

    scene, two, (src_a, mask_a, src_b, mask_b, _, placement) = _scene_of_two(comfy, pairs=2)
    assert two.source.shape[0] == 2 and two.layout.sources_of(1) == [0, 1]  # shared sources
    three = pipeline.add_geometry(two, torch.cat([src_b, src_a]), mask_b, placement)  # one source per target
    assert three.layout == PairLayout(6, 2, 3)
    assert torch.equal(three.source[3:5], torch.cat([src_a, src_b]))  # pair 1: its a, b, then its own (src_a)
    assert torch.equal(three.source[2], src_b[0]) and torch.equal(three.source[5], src_a[0])


def test_colour_shift_moves_each_geometry_by_its_own_rings(comfy):
    from harmonizing_attention.nodes.geometry import ColorShift

    scene, two, (src_a, mask_a, src_b, mask_b, target, _) = _scene_of_two(comfy)
    shifted = ColorShift.execute(two, "mean_shift", 0.5, 2).args[1]
    (_, _, vis_a), (_, _, vis_b) = two.parts()
    expect_a = color.mean_shift(two.geometry, vis_a, src_a, mask_a, target, 0.5, 2)
    expect = color.mean_shift(expect_a, vis_b, src_b, mask_b, target, 0.5, 2)
    assert torch.equal(shifted.geometry, expect)
    assert shifted.color_adjusted
    one = ColorShift.execute(scene, "mean_shift", 0.5, 2).args[0]  # one geometry: eq. 1 as before
    assert torch.equal(one, color.mean_shift(scene.geometry, scene.geometry_mask, src_a, mask_a, target, 0.5, 2))


def test_add_geometry_refuses_bad_inputs(comfy):
    from harmonizing_attention.nodes.geometry import AddGeometry, ColorShift

    scene, two, (src_a, mask_a, *_) = _scene_of_two(comfy)
    shifted = ColorShift.execute(scene, "mean_shift", 0.5, 2).args[1]
    with pytest.raises(ValueError, match="add every geometry first"):
        AddGeometry.execute(shifted, src_a, mask_a, 0.0, 0.0, 1.0, 0.0)
    # a source of another size is placed at its own (its anchor at the same relative place, to a whole pixel offset),
    # its row padded to the scene's sources' size
    grown = AddGeometry.execute(scene, src_a[:, :32, :32], mask_a[:, :32, :32], 0.0, 0.0, 1.0, 0.0).args[2]
    assert grown.source.shape == (2, 48, 48, 3) and torch.equal(grown.source[1, :32, :32], src_a[0, :32, :32])
    assert torch.equal(grown.source_mask[1], box(48, 10, 22, 10, 22)[0]) and torch.equal(grown.source[0], src_a[0])
    assert torch.equal(grown.placed_masks[0, 1], box(48, 18, 30, 18, 30)[0])
    with pytest.raises(ValueError, match="source has a batch of 3 but the scene has 1 targets"):
        AddGeometry.execute(scene, src_a.expand(3, -1, -1, -1), mask_a, 0.0, 0.0, 1.0, 0.0)


# ---------------------------------------------------------------- whole graphs


def multi_graph(**kwargs):
    """graph() with a second geometry (a box of the same source, moved) added before the colour shift."""
    prompt = graph(**kwargs)
    prompt["20"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 8, "height": 20}}
    prompt["21"] = {"class_type": "MaskComposite", "inputs": {"destination": ["4", 0], "source": ["20", 0], "x": 4,
                                                              "y": 30, "operation": "add"}}
    prompt["22"] = {"class_type": "HA_AddGeometry", "inputs": {
        "scene": ["6", 2], "source": ["3", 0], "source_mask": ["21", 0],
        "shift_x": 44.0, "shift_y": 4.0, "scale": 1.0, "rotation": 90.0}}
    prompt["7"]["inputs"]["scene"] = ["22", 2]
    return prompt


def test_two_geometries_in_one_pass_end_to_end(tiny):
    out = harness.run_prompt(multi_graph(steps=2, renoise_iterations=1))
    latent, sources = out["10"][0]["samples"], out["10"][1]["samples"]
    assert latent.shape == (1, 4, 8, 8) and sources.shape == (2, 4, 8, 8)  # one output, one row per source
    assert torch.isfinite(latent).all() and out["11"][0].shape == (1, 64, 64, 3)
    mask = out["22"][1]
    assert mask.shape == (1, 64, 64) and mask[0, :, 44:].any()  # the second geometry is on the canvas


def test_one_geometry_with_the_new_inputs_at_their_defaults_is_bit_identical(tiny):
    """Old workflows (no balance inputs) and the new defaults give the same latents, bit for bit."""
    old = harness.run_prompt(graph(steps=2, renoise_iterations=1))["10"][0]["samples"]
    prompt = graph(steps=2, renoise_iterations=1, balance="paper", balance_weight=1.0)
    prompt["10"]["inputs"].update(balance="paper", balance_weight=1.0)
    new = harness.run_prompt(prompt)["10"][0]["samples"]
    assert torch.equal(old, new)
    prompt["10"]["inputs"].update(balance="auto")  # and the balance does reach the sampler
    assert not torch.equal(harness.run_prompt(prompt)["10"][0]["samples"], old)


def test_shipped_multi_geometry_workflow(tiny):
    """The API twin as shipped (three small cracks on the brick wall, regional colour, auto balance): at its own
    512 px up to the colour shift; then whole with the tiny model, 1 step, on the example images at 64 px (as the
    app tests run it: the placements keep every crack on that canvas too)."""
    import comfy_server
    import folder_paths
    from test_pipeline import shipped, small

    prompt = small(shipped("api/multi_geometry_transfer.json"), steps=1, iterations=1)
    front = {k: v for k, v in prompt.items() if k in {"3", "5", "6", "14", "15", "7"}}
    front["40"] = {"class_type": "HATest_Keep", "inputs": {"value": ["7", 1]}}
    scene = harness.run_prompt(front)["7"][1]
    assert scene.geometries == 3 and scene.source.shape[0] == 3 and scene.color_adjusted
    placed = scene.placed_masks[0]
    assert all(m.any() for m in placed)
    assert not any((placed[i] * placed[j]).any() for i, j in ((0, 1), (0, 2), (1, 2)))  # three cracks, apart

    inputs = Path(folder_paths.get_input_directory())
    for name in ("crack_source.png", "target_brick.png"):  # the source's alpha holds the mask (LoadImage's MASK)
        comfy_server.small_copy(inputs / name, inputs / f"small_{name}")
    for key in ("3", "5"):
        prompt[key]["inputs"]["image"] = "small_" + prompt[key]["inputs"]["image"]
    prompt["12"]["inputs"]["filename_prefix"] = "shipped_multi/multi_geometry_transfer"
    out = harness.run_prompt(prompt)
    assert out["10"][1]["samples"].shape[0] == 3  # one inversion, one generation: three source rows
    canvas = out["7"][1].window.canvas_hw  # the working region: the 64 px target enlarged (at most 2x)
    assert out["11"][0].shape == (1, *canvas, 3) and canvas == (128, 128) and torch.isfinite(out["11"][0]).all()
    assert out["16"][0].shape == (1, 64, 64, 3)  # the saved image: the target outside the union's blend band
    assert harness.composite_keeps_target(*out["16"], out["5"][0])
    assert all(m.any() for m in out["7"][1].placed_masks[0])
