"""The same nodes on SDXL, SDXL inpainting and SD2.x v-prediction; a family the pack cannot patch is refused.

Tiny random-weight models built through ComfyUI's own supported_models classes (conftest `families`).
The attention checks reuse tests/test_attention.py's helpers and reference formulas on these UNets;
the v-prediction checks drive our inversion and sampling loops through ComfyUI's real model sampling
with a closed-form network output and compare with diffusers' DDIM schedulers.
"""
import copy
import json

import harness
import pytest
import torch
from harmonizing_attention.attention import inversion
from harmonizing_attention.attention.roles import (
    Layer,
    RowPlan,
)
from test_attention import _unet_out
from test_inversion import SD15, SHAPE, STEPS, _double, _inverse_grid, _inverse_scheduler, _unet
from test_pipeline import graph, shipped, small

SDXL_SIZES = {"width": 1024, "height": 768, "crop_w": 8, "crop_h": 16, "target_width": 1024, "target_height": 768}


def _layers_seen(model, rows, x, context):
    """Layer (stage, downscale) of every self-attention call our patch makes, in call order."""
    from harmonizing_attention.nodes.patch import apply_plan

    seen = []

    def rules(layer):
        seen.append(layer)
        return [None] * rows

    _unet_out(apply_plan(model, RowPlan(rows, rules)), x, context)
    return seen


# ---------------------------------------------------------------- blocks and layers of each family


def test_self_attention_blocks_cover_every_sdxl_transformer_block(families):
    """SDXL: transformer depth 2 at 1/2 size and 10 at 1/4 (encoder, middle, decoder), none at full size."""
    from comfy.ldm.modules.attention import SpatialTransformer
    from harmonizing_attention.nodes.patch import apply_plan, self_attention_blocks

    model = families["tiny-sdxl"][0]
    unet = model.model.diffusion_model
    blocks = self_attention_blocks(model)
    depth = {}
    for stage, block_id, index in blocks:
        depth[(stage, block_id)] = max(depth.get((stage, block_id), 0), index + 1)
    assert depth == {("input", 4): 2, ("input", 5): 2, ("input", 7): 10, ("input", 8): 10, ("middle", 0): 10,
                     ("output", 0): 10, ("output", 1): 10, ("output", 2): 10,
                     ("output", 3): 2, ("output", 4): 2, ("output", 5): 2}
    assert len(blocks) == len(set(blocks)) == 70
    every = sum(len(m.transformer_blocks) for m in unet.modules() if isinstance(m, SpatialTransformer))
    assert len(blocks) == every
    patched = apply_plan(model, RowPlan(1, lambda layer: [None]))
    assert set(patched.model_options["transformer_options"]["patches_replace"]["attn1"]) == {
        (stage, block_id) for stage, block_id, _ in blocks}


@pytest.mark.parametrize("name, latent, expected", [
    # SDXL: no self-attention at full latent size; 2 blocks per level at 1/2, 10 at 1/4
    ("tiny-sdxl", (16, 16), {("input", 2): 4, ("input", 4): 20, ("middle", 4): 10, ("output", 4): 30,
                             ("output", 2): 6}),
    ("tiny-sdxl", (10, 13), {("input", 2): 4, ("input", 4): 20, ("middle", 4): 10, ("output", 4): 30,
                             ("output", 2): 6}),  # odd sizes: 13 -> 7 -> 4 wide, still 1/2 and 1/4
    ("tiny-sd2v", (16, 16), {("input", 1): 1, ("input", 2): 1, ("middle", 2): 1, ("output", 2): 2,
                             ("output", 1): 2}),
])
def test_layers_map_by_resolution_and_stage(families, name, latent, expected):
    model, context_dim = harness.direct_unet(families[name][0])
    torch.manual_seed(8)
    x = torch.randn(1, 4, *latent)
    seen = _layers_seen(model, 1, x, torch.randn(1, 77, context_dim))
    counts = {}
    for layer in seen:
        counts[(layer.stage, layer.downscale)] = counts.get((layer.stage, layer.downscale), 0) + 1
    assert counts == expected
    # encoder first, then middle, then decoder; resolution falls then rises again
    order = [layer.stage for layer in seen]
    assert order == sorted(order, key=["input", "middle", "output"].index)


# ---------------------------------------------------------------- v-prediction through ComfyUI's model sampling


def _closed_form(model, unet):
    """A clone whose network output is unet(x_t, t) (here v) of the UNet's own input x_t and timestep t:
    ComfyUI's model sampling still scales the input, maps sigma to t and turns v into x0."""

    def network(executor, x, timesteps, *args, **kwargs):
        t = timesteps.unique()
        assert len(t) == 1, timesteps
        return unet(x.double(), float(t)).to(x.dtype)

    return harness.with_diffusion_wrapper(model, "ha-test-closed-form", network)


def _sd2v(families):
    import comfy.model_sampling

    model = families["tiny-sd2v"][0]
    assert isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.V_PREDICTION)
    return model, [[torch.zeros(1, 77, harness.TINY_CONTEXT_DIM), {}]]


def test_v_prediction_schedule_is_diffusers_ddim(families):
    """ComfyUI's SD2 sigmas are diffusers' scaled_linear alphas; ddim_uniform gives DDIM's timesteps."""
    from diffusers import DDIMScheduler
    from harmonizing_attention.nodes import pipeline

    model, _ = _sd2v(families)
    sched = _double(DDIMScheduler(**SD15, set_alpha_to_one=True, prediction_type="v_prediction"))
    sched.set_timesteps(STEPS)
    abar = sched.alphas_cumprod
    comfy_sigmas = model.get_model_object("model_sampling").sigmas.double()
    torch.testing.assert_close(comfy_sigmas, ((1 - abar) / abar).sqrt(), rtol=2e-5, atol=0)
    expect = torch.cat([comfy_sigmas[sched.timesteps], torch.zeros(1, dtype=torch.float64)])
    torch.testing.assert_close(pipeline.schedule(model, STEPS).double(), expect, rtol=0, atol=0)


def test_v_prediction_inversion_matches_diffusers(families):
    """Our DDIM inversion through ComfyUI's sampler on a V_PREDICTION model = DDIMInverseScheduler(v)."""
    from harmonizing_attention.nodes import pipeline

    model, cond = _sd2v(families)
    unet = _unet(4)
    sched = _inverse_scheduler("v_prediction")
    abar = sched.alphas_cumprod
    sources, targets = _inverse_grid(sched)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x_t, ref = x0 * abar[0].sqrt(), []
    for src, t in zip(sources, targets, strict=True):
        x_t = sched.step(unet(x_t, src), t, x_t).prev_sample
        ref.append(x_t)

    ours = []

    def loop(denoise, x, s, callback):
        def record(i, n, xs):
            ours.append(xs.double() * abar[targets[i]].sqrt())
            callback(i, n, xs)
        return inversion.invert(denoise, x, s, iterations=1, callback=record)

    sigmas = model.get_model_object("model_sampling").sigmas[[sources[0]] + targets]
    scale = model.model.latent_format.scale_factor  # the sampler works on process_latent_in(latent)
    out = pipeline.run_sampler(_closed_form(model, unet), loop, (x0 / scale).float(), sigmas, cond, cond, 1.0)
    assert len(ours) == STEPS
    for got, want in zip(ours, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.double() * scale * abar[targets[-1]].sqrt(), ref[-1], rtol=1e-4, atol=1e-5)


def test_v_prediction_sampling_matches_diffusers(families):
    """Our DDIM sampling over pipeline.schedule on a V_PREDICTION model = DDIMScheduler(v), down to x0."""
    from diffusers import DDIMScheduler
    from harmonizing_attention.nodes import pipeline

    model, cond = _sd2v(families)
    unet = _unet(2)
    sched = _double(DDIMScheduler(**SD15, set_alpha_to_one=True, prediction_type="v_prediction"))
    sched.set_timesteps(STEPS)
    abar = sched.alphas_cumprod
    timesteps = [int(t) for t in sched.timesteps]
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x, ref = x_T, []
    for t in timesteps:
        x = sched.step(unet(x, t), t, x, eta=0.0).prev_sample
        ref.append(x)

    scales = [abar[t].sqrt() for t in timesteps[1:]] + [torch.tensor(1.0, dtype=torch.float64)]
    ours = []

    def loop(denoise, x_, s, callback):
        def record(i, n, xs):
            ours.append(xs.double() * scales[i])
            callback(i, n, xs)
        return inversion.sample(denoise, x_, s, callback=record)

    scale = model.model.latent_format.scale_factor
    start = (x_T / abar[timesteps[0]].sqrt() / scale).float()
    out = pipeline.run_sampler(_closed_form(model, unet), loop, start, pipeline.schedule(model, STEPS), cond, cond, 1.0)
    assert len(ours) == STEPS
    for got, want in zip(ours, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.double() * scale, ref[-1], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- SDXL conditioning and end to end


def _scene(size=64):
    from harmonizing_attention.nodes.pipeline import Scene

    gen = torch.Generator().manual_seed(9)
    mask = torch.zeros(1, size, size)
    mask[:, 16:40, 20:44] = 1
    return Scene(source=torch.rand(1, size, size, 3, generator=gen), source_mask=mask,
                 target=torch.rand(1, size, size, 3, generator=gen),
                 geometry=torch.rand(1, size, size, 3, generator=gen), geometry_mask=mask.roll(8, -1))


def test_sdxl_conditioning_reaches_the_unet_untouched(families):
    """Pooled output and size conditioning (ADM input y) and the text context reach every UNet call of both
    stages as ComfyUI builds them, next to the inpainting concat our pipeline adds: cond and uncond alike."""
    from harmonizing_attention.nodes import pipeline, reuse

    model, clip, vae = families["tiny-sdxl-inpaint"]
    calls = []

    def spy(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        calls.append((x.shape, list(transformer_options["cond_or_uncond"]), context.clone(), y.clone()))
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)

    spied = harness.with_diffusion_wrapper(model, "ha-test-spy", spy)
    encoded = {}
    for key, text, sizes in (("pos", "a wall", SDXL_SIZES), ("neg", "blurry", {"width": 512, "height": 512})):
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        encoded[key] = ([[cond, {"pooled_output": pooled, **sizes}]], cond, model.model.encode_adm(
            pooled_output=pooled, **sizes))
    (positive, pos_ctx, pos_y), (negative, neg_ctx, neg_y) = encoded["pos"], encoded["neg"]
    before = copy.deepcopy(positive)
    reuse.CACHE.clear()  # the sources' inversion is computed, not taken from an earlier test
    inverted = pipeline.invert(spied, vae, positive, _scene(), steps=2, iterations=1, average_last=1,
                               mode="texture_aligning")
    inversion_calls = len(calls)
    pipeline.generate(spied, positive, negative, pipeline.blend_latents(inverted, 0.0), cfg=2.0,
                      mode="geometry_preserving")
    assert inversion_calls == 2 * 2 and len(calls) > inversion_calls  # 2 steps: sources, then [target, geometry]
    for shape, chunks, context, y in calls:
        assert shape[1] == 9  # the inpainting concat, 4 + 1 + 4 channels
        rows = shape[0] // len(chunks)
        for c, kind in enumerate(chunks):
            ctx, adm = (pos_ctx, pos_y) if kind == 0 else (neg_ctx, neg_y)
            sl = slice(c * rows, (c + 1) * rows)
            torch.testing.assert_close(y[sl], adm.expand(rows, -1))
            torch.testing.assert_close(context[sl], ctx.expand(rows, -1, -1))
    assert {1} <= {kind for _, chunks, *_ in calls for kind in chunks}  # the uncond pass was seen
    assert torch.equal(positive[0][0], before[0][0]) and positive[0][1].keys() == before[0][1].keys()


@pytest.mark.parametrize("ckpt", ["tiny-sdxl", "tiny-sdxl-inpaint", "tiny-sd2v"])
def test_geometry_transfer_end_to_end(families, ckpt):
    out = harness.run_prompt(graph(ckpt=ckpt, steps=2, renoise_iterations=1))
    latent, source = out["10"][0]["samples"], out["10"][1]["samples"]
    assert latent.shape == source.shape == (1, 4, 8, 8)
    assert torch.isfinite(latent).all() and torch.isfinite(out["11"][0]).all()
    assert out["11"][0].shape == (1, 64, 64, 3)


# ---------------------------------------------------------------- families the pack cannot patch


def test_unsupported_family_fails_at_the_first_model_node(families):
    from harmonizing_attention.nodes import validate
    from harmonizing_attention.nodes.patch import UnsupportedModel

    with pytest.raises(UnsupportedModel, match=r"this model is PixArtAlpha \(a PixArtMS diffusion model\), not a UNet"):
        validate.unet(families["tiny-pixart"][0])
    prompt = graph(ckpt="tiny-pixart")
    with pytest.raises(harness.PromptError) as err:
        harness.run_prompt(prompt)
    text = str(err.value) + json.dumps(err.value.details, default=str)
    assert "this model is PixArtAlpha" in text and "SDXL" in text and "Flux.1" in text
    assert "HA_TextureAligningInversion" in text  # the first node that receives the MODEL
    no_attention = harness.tiny_model(transformer_depth=[0, 0], transformer_depth_output=[0, 0, 0, 0],
                                      transformer_depth_middle=-1)
    with pytest.raises(UnsupportedModel, match="this SD15 UNet .* has no SpatialTransformer self-attention block"):
        validate.unet(no_attention)


# ---------------------------------------------------------------- the shipped SDXL workflow


def test_shipped_sdxl_workflow(families):
    """The SDXL API twin with tiny SDXL swapped in. Up to the colour shift as shipped: the 512 px examples at their own
    size, the model's 1024 px canvas planned by the working region; then whole, with a 64 px working region and 1 step
    (a 1024 px VAE and UNet pass take minutes on this CPU)."""
    prompt = shipped("api/geometry_transfer_sdxl.json", ckpt="tiny-sdxl")
    front = {k: v for k, v in prompt.items() if v["class_type"] not in (
        "HA_TextureAligningInversion", "HA_LatentBlend", "HA_GeometryPreservingSampler", "VAEDecode", "SaveImage",
        "HA_DetailPreservingComposite")}
    out = harness.run_prompt(front)
    geometry_mask, scene = out["6"][1], out["7"][1]
    assert out["7"][0].shape == (1, 512, 512, 3) and geometry_mask.shape == (1, 512, 512)
    assert set(scene.source_mask.unique().tolist()) == {0.0, 1.0}
    assert scene.window.canvas_hw == (1024, 1024)  # SDXL's size: the whole 512 px target, enlarged 2x

    prompt["6"]["inputs"]["working_size"] = 64
    out = harness.run_prompt(small(prompt, steps=1, iterations=1))
    assert out["11"][0].shape[1:3] == out["7"][1].window.canvas_hw and torch.isfinite(out["11"][0]).all()
    assert out["19"][0].shape == (1, 512, 512, 3)


def test_downscale_is_a_power_of_two_for_any_latent_size():
    """patch._downscale: the UNet's halving rounds up, so the factor is a power of two for any latent size."""
    from harmonizing_attention.nodes.patch import _downscale

    assert _downscale((128, 128), (64, 64)) == 2 and _downscale((128, 128), (32, 32)) == 4
    assert _downscale((13, 13), (7, 7)) == 2 and _downscale((13, 13), (4, 4)) == 4  # round(13 / 4) would be 3
    assert _downscale((10, 13), (3, 4)) == 4 and _downscale((9, 9), (9, 9)) == 1
    assert _downscale((5, 5), (3, 3)) == 2 and _downscale((5, 5), (2, 2)) == 4
    assert Layer("input", _downscale((96, 64), (12, 8))).downscale == 8
