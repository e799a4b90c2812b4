"""Thin geometry survives: one rule (attention/tokens.py) from a pixel mask to the latent cells of eq. 4's blend, the
inpainting model's mask channel and the attention tokens of every layer; and the source row is untouched by the
other rows."""
import logging

import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

import harness
import thin_masks
from harmonizing_attention.attention import tokens

SIZES = (64, 32, 16, 8)  # SD1.5's layer sizes at 512 px: the latent, then each UNet level
MASKS = thin_masks.masks()
THIN = ("crack 2 px", "crack 3 px", "line 1 px", "scratch 3 px")


@pytest.mark.parametrize("name", list(MASKS))
def test_every_part_survives_unbroken_at_every_resolution(name):
    mask = MASKS[name]
    for size in SIZES:
        cells = tokens.cells(mask[None], size, size)[0]
        c = tokens.coverage(mask[None], size, size)[0]
        parts, lost, broken = thin_masks.lost_and_broken(mask, cells)
        assert cells.any() and lost == 0 and broken == 0, (name, size, parts, lost, broken)
        assert cells[c >= 0.5].all()  # every cell covered at least half is in
        assert not cells[c == 0].any()  # and none the mask does not touch
        touched = c > 0
        assert cells.sum() <= touched.sum() and c[cells].mean() >= c[touched].mean()


@pytest.mark.parametrize("name", ["blob (shipped)", "large"])
def test_wide_regions_get_the_majority_cells(name):
    """A region wider than a cell: exactly the cells it covers at least half (eq. 4 as published)."""
    for size in SIZES:
        c = tokens.coverage(MASKS[name][None], size, size)[0]
        assert torch.equal(tokens.cells(MASKS[name][None], size, size)[0], c >= 0.5)


def test_thin_structures_keep_the_cells_they_run_through():
    # the 1-px line from x = 40 to 470 at a slope of -0.37: one cell per column it crosses, an unbroken run of
    # columns; an end cell holding at most half what its neighbour holds is dropped (at 64: none; at 32: both ends)
    for size in SIZES:
        cells = tokens.cells(MASKS["line 1 px"][None], size, size)[0]
        columns = cells.any(0).nonzero().squeeze(1).tolist()
        assert cells.sum() == len(columns) == columns[-1] - columns[0] + 1
        assert 0 <= columns[0] - 40 * size // 512 <= 1 and 0 <= 470 * size // 512 - columns[-1] <= 1
        if size == 64:
            assert columns == list(range(5, 59))
    # the 3-px scratch on pixel rows 255-257 (latent rows 31 and 32 hold 1 and 2 of its rows): one row of cells,
    # the fuller one, where the majority rule had none and coverage > 0 had two
    cells = tokens.cells(MASKS["scratch 3 px"][None], 64, 64)[0]
    assert cells.any(1).nonzero().squeeze(1).tolist() == [32] and cells[32, 5:59].all()
    # cracks: against the old token rule (coverage > 0), the cells merely grazed are gone
    for name in ("crack 2 px", "crack 3 px"):
        c = tokens.coverage(MASKS[name][None], 64, 64)[0]
        cells = tokens.cells(MASKS[name][None], 64, 64)[0]
        assert cells.sum() < 0.7 * (c > 0).sum() and c[cells].min() > 0.1


def test_rings_stay_closed_and_edge_cases():
    ring = thin_masks.ellipse(256, 256, 120, 90) - thin_masks.ellipse(256, 256, 117.5, 87.5)  # a 2.5 px outline
    for size in SIZES:
        cells = tokens.cells(ring[None], size, size)[0].numpy()
        assert ndimage.label(~cells)[1] == 2, size  # inside and outside stay apart (4-connected background)
    # border-touching crack, empty and full masks, several rows at once, a grid that does not divide the image
    crack = thin_masks.polyline([(0.0, 3.0), (200.0, 0.5), (511.0, 2.0)], 2.0)
    batch = torch.stack([crack, torch.zeros(512, 512), torch.ones(512, 512)])
    for size in (64, 13, 7, 4):
        cells = tokens.cells(batch, size, size)
        parts, lost, broken = thin_masks.lost_and_broken(crack, cells[0])
        assert (lost, broken) == (0, 0) and cells[0, 0].all()
        assert not cells[1].any() and cells[2].all()
    assert torch.equal(tokens.region_tokens(batch, 13, 7), tokens.cells(batch, 13, 7).flatten(1))


def test_latent_mask_is_the_cells_and_feather_blurs_them():
    mask = MASKS["crack 3 px"][None]
    cells = tokens.cells(mask, 64, 64)
    binary = tokens.latent_mask(mask, 64, 64)
    assert binary.shape == (1, 1, 64, 64) and torch.equal(binary[:, 0] > 0, cells) and set(binary.unique().tolist()) == {0, 1}
    soft = tokens.latent_mask(mask, 64, 64, feather=1.5)
    g = torch.exp(-0.5 * (torch.arange(-5, 6.0) / 1.5) ** 2)
    kernel = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]
    expect = F.conv2d(F.pad(binary, (5, 5, 5, 5), mode="replicate"), kernel)
    torch.testing.assert_close(soft, expect)
    assert soft.max() <= 1 and (soft > 0.01).sum() > cells.sum()


# ---------------------------------------------------------------- the pipeline: one set of cells everywhere

def _scene(mask_src, mask_geo, size):
    from harmonizing_attention.nodes import pipeline

    source = harness.make_image("noise:1", size, size)
    target = harness.make_image("checker", size, size)
    geometry = target * (1 - mask_geo[..., None]) + source * mask_geo[..., None]
    return pipeline.Scene(source=source, source_mask=mask_src[None], target=target, geometry=geometry,
                          geometry_mask=mask_geo[None])


def _recording(model, seen):
    """A clone of `model` that records the UNet input of every call (x, mask channel, masked image: 9 channels)."""
    def record(executor, x, *args, **kwargs):
        seen.append(x[:, 4].detach().clone())
        return executor(x, *args, **kwargs)

    return harness.with_diffusion_wrapper(model, "ha-test-record-mask", record)


@pytest.fixture(scope="module")
def attention_everywhere(tiny):
    """A tiny inpainting UNet with self-attention at both levels, the latent's size included (tiny-inpaint has it
    only at half size, to stay fast at 512 px)."""
    return harness.tiny_model(in_channels=9, seed=13)


@pytest.mark.parametrize("size", [512, 128])
@torch.no_grad()  # as ComfyUI runs nodes
def test_blend_inpainting_mask_and_tokens_agree_on_the_cells(tiny, attention_everywhere, single_thread, monkeypatch,
                                                             size):
    """A thin crack as M_src and dots (512 px: the droplets) or a 1.5-px crack as M_geo: the inpainting model's mask
    channel (what the UNet receives, in inversion and generation), eq. 4's blend mask and the source tokens at every
    attention layer (512 px: tiny-inpaint's 32x32; 128 px: 16x16 = the latent, and 8x8) are the rule's cells of the
    row's mask."""
    from harmonizing_attention.attention.roles import RowPlan
    from harmonizing_attention.nodes import pipeline, reuse

    _, clip, vae = tiny["tiny-inpaint"]
    if size == 512:
        model, m_src, m_geo = tiny["tiny-inpaint"][0], MASKS["crack 3 px"], MASKS["droplets"]
    else:
        model = attention_everywhere
        m_src = thin_masks.polyline([(x / 4, y / 4) for x, y in thin_masks.crack_path(1)], 2.0, size)
        m_geo = thin_masks.polyline([(x / 4, y / 4) for x, y in thin_masks.crack_path(0)], 1.5, size)
    scene = _scene(m_src, m_geo, size)
    seen, layers = [], {}
    original = RowPlan.region_tokens

    def region_tokens(self, h, w, device=None):
        out = original(self, h, w, device)
        if out:  # the generation plan (the inversion's has no regions)
            layers[(h, w)] = {row: t.cpu() for row, t in out.items()}
        return out

    monkeypatch.setattr(RowPlan, "region_tokens", region_tokens)
    reuse.CACHE.clear()  # the sources are computed, not taken from an earlier test's run
    recorded = _recording(model, seen)
    cond = [[torch.zeros(1, 77, harness.TINY_CONTEXT_DIM), {}]]
    inverted = pipeline.invert(recorded, vae, cond, scene, steps=1, iterations=1, average_last=1,
                               mode="texture_aligning")
    inverted = pipeline.blend_latents(inverted, feather=0.0)
    pipeline.generate(recorded, cond, cond, inverted, cfg=1.0, mode="geometry_preserving")

    latent = size // 8
    src, geo = (tokens.cells(m[None], latent, latent)[0].float() for m in (m_src, m_geo))
    assert src.any() and geo.any()
    assert torch.equal(inverted.blend_mask[0, 0].cpu(), geo)
    # the sources run as a batch of their own (nodes/reuse.py): inversion [src] then [tar, geo]; generation [src]
    # then [out]. Every call's mask channel is its rows' cells.
    pairs = [x for x in seen if x.shape[0] == 2]
    singles = [x[0].cpu() for x in seen if x.shape[0] == 1]
    assert len(seen) == len(pairs) + len(singles) and pairs and singles
    for x in pairs:
        assert torch.equal(x[0].cpu(), geo) and torch.equal(x[1].cpu(), geo)
    assert all(torch.equal(x, src) or torch.equal(x, geo) for x in singles)
    assert any(torch.equal(x, src) for x in singles) and any(torch.equal(x, geo) for x in singles)
    assert set(layers) == ({(32, 32)} if size == 512 else {(16, 16), (8, 8)})
    for (h, w), rows in layers.items():
        assert torch.equal(rows[0], tokens.cells(m_src[None], h, w)[0].flatten().nonzero().squeeze(1)), (h, w)
    if size == 128:
        assert torch.equal(layers[(latent, latent)][0], src.flatten().nonzero().squeeze(1))


def test_thin_regions_are_reported_with_numbers_and_the_fix(tiny, single_thread, caplog):
    from harmonizing_attention.nodes.geometry import region_notes
    from test_pipeline import graph

    notes = region_notes(_scene(MASKS["crack 3 px"], MASKS["blob (shipped)"], 512), 8)
    assert len(notes) == 1
    assert notes[0].startswith("source_mask is thinner than a latent cell for the 64x64 latent grid (8x8 px cells): "
                               "1654 px, 25.8 cells' worth of area, carried on 62 latent cells")
    assert "upscale" in notes[0] and "GrowMask" in notes[0]
    dot = thin_masks.ellipse(100, 100, 6, 6)
    assert "geometry_mask is small for the 64x64 latent grid" in region_notes(_scene(MASKS["large"], dot, 512), 8)[0]
    assert region_notes(_scene(MASKS["large"], MASKS["blob (shipped)"], 512), 8) == []
    # through the graph: a 2-px scratch, said by HA_TextureAligningInversion before it inverts; the run goes on
    with caplog.at_level(logging.WARNING):
        out = harness.run_prompt(graph(mask_box=(16, 18, 8, 48)))
    assert ("source_mask is small and thinner than a latent cell for the 8x8 latent grid (8x8 px cells): 80 px, "
            "1.2 cells' worth of area, carried on 5 latent cells that it covers 25% on average") in caplog.text
    assert torch.isfinite(out["10"][0]["samples"]).all()


def test_conditioning_of_another_width_is_refused_at_the_first_node(tiny):
    """An SDXL-wide text encoding into an SD1.5-shaped model: refused by the first node that gets both
    (HA_TextureAligningInversion, HA_AppearanceInversion), naming both widths and the fix, instead of a matmul
    error inside sampling."""
    from harmonizing_attention.nodes import validate
    from test_pipeline import graph

    model = tiny["tiny"][0]
    with pytest.raises(ValueError, match=r"has 64-wide text tokens .* takes 32-wide tokens .* CLIP output"):
        validate.conditioning_width(model, [[torch.zeros(1, 77, 2 * harness.TINY_CONTEXT_DIM), {}]], "the conditioning")
    validate.conditioning_width(model, [[torch.zeros(1, 77, harness.TINY_CONTEXT_DIM), {}]], "the conditioning")
    with pytest.raises(ValueError, match=r"768-wide text tokens \(CLIP-L, as SD1.x uses\) .* 2048-wide tokens "
                                         r"\(CLIP-L \+ OpenCLIP ViT-bigG, as SDXL uses\)"):
        validate.conditioning_width(harness.tiny_model(seed=9, context_dim=2048), [[torch.zeros(1, 77, 768), {}]], "x")

    tiny.setdefault("tiny-sdxl-clip", (model, harness.tiny_sdxl_clip(seed=3), tiny["tiny"][2]))
    prompt = graph(ckpt="tiny")
    prompt["21"] = {"class_type": "HATest_TinyCheckpoint", "inputs": {"ckpt_name": "tiny-sdxl-clip"}}
    prompt["2"]["inputs"]["clip"] = ["21", 1]
    with pytest.raises(harness.PromptError) as err:
        harness.run_prompt(prompt)
    assert "64-wide text tokens" in str(err.value) and "HA_TextureAligningInversion" in str(err.value) + str(err.value.details)
    # appearance transfer's first node too
    from test_cross_image import graph as cross_graph

    prompt = cross_graph()
    prompt["21"] = {"class_type": "HATest_TinyCheckpoint", "inputs": {"ckpt_name": "tiny-sdxl-clip"}}
    prompt["2"]["inputs"]["clip"] = ["21", 1]
    with pytest.raises(harness.PromptError) as err:
        harness.run_prompt(prompt)
    assert "64-wide text tokens" in str(err.value) and "HA_AppearanceInversion" in str(err.value) + str(err.value.details)


# ---------------------------------------------------------------- the source row is the source alone

class _Float64Latents:
    """The VAE, handing its latents over in float64 (the sampler then runs in float64 around the float64 UNet)."""

    def __init__(self, vae):
        self.vae = vae

    def encode(self, images):
        return self.vae.encode(images).double()

    def spacial_compression_encode(self):
        return self.vae.spacial_compression_encode()


@pytest.fixture(scope="module")
def float64_inpaint(tiny):
    model = harness.tiny_model(in_channels=9, seed=21)
    model.model.diffusion_model.to(torch.float64)
    model.model.diffusion_model.dtype = torch.float64
    return model, _Float64Latents(tiny["tiny"][2])


@pytest.mark.parametrize("cfg", [1.0, 3.0])
@torch.no_grad()  # as ComfyUI runs nodes
def test_source_row_equals_the_source_alone(float64_inpaint, single_thread, cfg):
    """In the full pipeline (Texture-aligning inversion of [src, tar, geo], blend, Geometry-preserving generation of
    [src, out], cond and uncond chunks batched when cfg > 1) the source row's inversion and reconstruction equal
    inverting and sampling the source alone with the same schedule and inpainting inputs, and do not change at all
    when the other rows change: no leakage between rows or conditioning chunks."""
    from harmonizing_attention.attention import inversion
    from harmonizing_attention.nodes import pipeline

    model, vae = float64_inpaint
    gen = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 77, harness.TINY_CONTEXT_DIM, generator=gen), {}]]
    negative = [[torch.randn(1, 77, harness.TINY_CONTEXT_DIM, generator=gen), {}]]
    mask = torch.zeros(64, 64)
    mask[16:40, 20:44] = 1
    scene = _scene(mask, torch.roll(mask, 8, 1), 64)
    steps, iterations = 3, 2

    def full(scene):
        inverted = pipeline.blend_latents(pipeline.invert(model, vae, positive, scene, steps, iterations, 1,
                                                          "texture_aligning"), 0.0)
        out, src = pipeline.generate(model, positive, negative, inverted, cfg, "geometry_preserving")
        return inverted, out, src

    inverted, out, src = full(scene)
    assert all(p.dtype == torch.float64 for p in model.model.diffusion_model.parameters())

    # alone: the source row's own latent, masked image and mask; plain model, same schedule
    z0 = vae.encode(scene.source)
    masked = pipeline.masked_image_latents(vae, scene.source, scene.source_mask)
    pos, neg = (pipeline.with_inpaint(c, masked, scene.source_mask) for c in (positive, negative))
    z_t = pipeline.invert_latents(model, z0, inverted.sigmas, pos, iterations, 1)
    alone = pipeline.run_sampler(model, lambda d, x, s, cb: inversion.sample(d, x, s, callback=cb), z_t,
                                 inverted.sigmas, pos, neg, cfg)
    # float64 throughout, except where ComfyUI rounds to float32: the UNet's output (model_base._apply_model) and
    # the sampler's result (samplers.CFGGuider.sample). A batch of 2 rows rounds a few values 1 ulp apart from a batch
    # of 1; measured on this model with the source alone in batches of 1 and 2: up to 1.1e-6 (z_T), 1.9e-6 (cfg 3
    # output). A leak would be of the order of the rows' differences (> 1e-2); the exact check is the one below.
    torch.testing.assert_close(inverted.latents[:1], z_t, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(src, alone, rtol=1e-5, atol=1e-5)
    assert (out - src).abs().max() > 1e-2  # the rows do differ

    # other target, other geometry placement: the source row does not move by a single bit
    moved = _scene(mask, torch.roll(mask, -8, 0), 64)
    moved = pipeline.Scene(source=moved.source, source_mask=moved.source_mask,
                           target=harness.make_image("gradient", 64, 64), geometry=moved.geometry.flip(1),
                           geometry_mask=moved.geometry_mask)
    other_inverted, other_out, other_src = full(moved)
    assert not torch.allclose(other_out, out)
    assert torch.equal(other_inverted.latents[:1], inverted.latents[:1]) and torch.equal(other_src, src)

