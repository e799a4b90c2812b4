"""Both methods' engine on the newer diffusion transformers, through the same hooks as Flux.1 / SD3 (test_dit.py): tiny
random-weight Flux.2 (patch 1 on 128-channel latents), Qwen-Image (5-D latents from a Wan VAE, [text; image]) and
Z-Image (Lumina 2's NextDiT: no block replace, caption and image padded to 32 tokens, refiners before the joint layers),
built through ComfyUI's own supported_models classes. A family this ComfyUI does not have is skipped with the reason
(0.3.64: Flux.2 and Z-Image), and so are the pipeline tests of one whose tiny VAE it cannot build (0.3.64 makes a Wan VAE
only at full width: Qwen-Image's model-level tests run there, its pipeline tests do not).

The joint-attention rule is checked in place against a naive float64 softmax at every attention call of a forward
(cond and uncond batched), identities run the models directly and through the pipeline, and the shipped workflow of each
family runs as it is with its loaders swapped for the tiny model.
"""

import harness
import pytest
import torch
from harmonizing_attention.attention.roles import PairLayout, RowPlan, texture_aligning_rules
from test_dit import (
    TXT,
    _recorder,
    _run,
    assert_identities,
    assert_rule_equals_naive,
    assert_shipped_dit_output,
    run_shipped_with_tiny_model,
)

pytestmark = pytest.mark.usefixtures("single_thread")

NAMES = list(harness.TINY_FAMILIES)
# name -> (latent (h, w), latent channels, image token grid (h, w), text tokens the joint attention holds for TXT)
LAYOUT = {
    "tiny-flux2": ((4, 5), 128, (4, 5), TXT),
    "tiny-qwen-image": ((8, 10), 16, (4, 5), TXT),
    "tiny-z-image": ((8, 10), 16, (4, 5), 32),  # the caption padded to a multiple of 32
}
WORKFLOW = {"tiny-flux2": "flux2", "tiny-qwen-image": "qwen_image", "tiny-z-image": "z_image"}


@pytest.fixture(scope="module")
def dit_families(tiny):
    """name -> (MODEL, CLIP, VAE) of the families this ComfyUI has; also reachable through HATest_TinyCheckpoint."""
    _, clip, _ = tiny["tiny"]
    models = {name: harness.tiny_family(name, clip) for name in NAMES if harness.family_missing(name) is None}
    tiny.update(models)
    return models


@pytest.fixture(params=NAMES)
def name(request, dit_families):
    """A family this ComfyUI has (the model-level tests need no VAE)."""
    reason = harness.family_missing(request.param)
    if reason:
        pytest.skip(reason)
    return request.param


@pytest.fixture
def needs_vae(name):
    """The pipeline and node tests: the family's tiny VAE, which this ComfyUI may not build."""
    reason = harness.family_missing(name, vae=True)
    if reason:
        pytest.skip(reason)


def _inputs(name, rows, seed=0):
    """x (5-D for Qwen-Image) and the model's keyword inputs for a direct call with a TXT-token context."""
    (h, w), channels, _, _ = LAYOUT[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, channels, *((1,) if name == "tiny-qwen-image" else ()), h, w, generator=gen)
    kwargs = {"c_crossattn": torch.randn(rows, TXT, harness.TINY_CONTEXT_DIM, generator=gen)}
    if name == "tiny-flux2":
        kwargs["guidance"] = torch.full((rows,), 4.0)
    if name == "tiny-z-image":
        kwargs["num_tokens"] = TXT
    return x, kwargs


def _where(options):
    """The joint block an attention call runs in: the pack's DitBlock as (kind, index), or the (block_type, block_index)
    Z-Image's forward writes ((None, None): a refiner)."""
    from harmonizing_attention.nodes.patch import BLOCK_KEY

    block = options.get(BLOCK_KEY)
    return (block.kind, block.index) if block else (options.get("block_type"), options.get("block_index"))


# every attention call of one forward: (block kind or None for a refiner, tokens)
CALLS = {
    "tiny-flux2": {("double_block", TXT + 20), ("single_block", TXT + 20)},
    "tiny-qwen-image": {("double_block", TXT + 20)},
    "tiny-z-image": {("double_block", 32 + 20 + 12), (None, 32)},  # joint layers; caption and image refiners
}


def test_joint_attention_equals_naive_reference_at_every_block_kind(dit_families, name):
    """test_dit's three rows per chunk, cond and uncond batched, on each family: every joint-attention call matches the
    naive reference, the text and image split taken from the model (the block's text or the padded caption, the
    patchified grid); calls outside the joint blocks (Z-Image's refiners) are plain attention."""
    _, _, (h, w), text = LAYOUT[name]

    def span(where, tokens):
        return (text, text + h * w) if where[0] in ("double_block", "single_block", "double") else None

    seen = assert_rule_equals_naive(dit_families[name][0], lambda rows: _inputs(name, rows), (h, w), span, _where)
    kinds = {"double": "double_block", "double_block": "double_block", "single_block": "single_block"}
    assert {(kinds.get(where[0]), tokens) for where, tokens in seen} == CALLS[name]


def test_identities_and_input_model_unchanged(dit_families, name):
    assert_identities(dit_families[name][0], lambda rows: _inputs(name, rows))


def test_a_latent_of_several_frames_is_refused(dit_families):
    """Qwen-Image's latents are 5-D: one frame is one image; several frames would be several token grids, which no rule
    knows how to place, so the first model call stops (Qwen-Image-Layered itself is refused before, by name)."""
    from harmonizing_attention.nodes.patch import apply_plan

    model = apply_plan(dit_families["tiny-qwen-image"][0],
                       RowPlan(3, lambda layer: texture_aligning_rules(PairLayout(1, 1))))
    x, kwargs = _inputs("tiny-qwen-image", 3)
    with pytest.raises(RuntimeError, match="this latent holds 2 frames"):
        _run(model, torch.cat([x, x], 2), kwargs)


def test_z_image_block_window_follows_the_layer_index(dit_families):
    """Z-Image has no block replace: its layers are placed by the block_index its forward writes. A window over the
    second of two layers ([0.5, 1)) patches that layer's call only; the refiners and the first layer run plain."""
    from harmonizing_attention.nodes.patch import apply_plan

    if "tiny-z-image" not in dit_families:
        pytest.skip(harness.family_missing("tiny-z-image"))
    model = dit_families["tiny-z-image"][0]
    layout = PairLayout(1, 1)
    patched = apply_plan(model, RowPlan(3, lambda layer: texture_aligning_rules(layout)), (0.5, 1.0))
    assert "dit" not in patched.model_options["transformer_options"].get("patches_replace", {})
    calls, plain_calls = [], []
    x, kwargs = _inputs("tiny-z-image", 3)
    _run(_recorder(patched, calls, _where), x, kwargs)
    probe = model.clone()
    probe.model_options["transformer_options"]["optimized_attention_override"] = lambda func, *a, **kw: func(*a, **kw)
    _run(_recorder(probe, plain_calls, _where), x, kwargs)
    assert [where for where, *_ in calls] == [(None, None), (None, None), ("double", 0), ("double", 1)]
    changed = [not torch.equal(ours[-1], theirs[-1]) for ours, theirs in zip(calls, plain_calls, strict=True)]
    assert changed == [False, False, False, True]


# ---------------------------------------------------------------- the pipeline and the nodes


def _scene(size=64, geometry_is_target=False, empty_source=False):
    from harmonizing_attention.nodes.pipeline import Scene

    gen = torch.Generator().manual_seed(3)
    source = torch.rand(1, size, size, 3, generator=gen)
    target = torch.rand(1, size, size, 3, generator=gen)
    mask = torch.zeros(1, size, size)
    mask[:, 16:40, 20:44] = 1.0
    geometry = target.clone() if geometry_is_target else torch.rand(1, size, size, 3, generator=gen)
    return Scene(source=source, source_mask=mask * (not empty_source), target=target, geometry=geometry,
                 geometry_mask=mask)


@pytest.mark.usefixtures("needs_vae")
def test_geometry_identical_to_target_inverts_as_plain(dit_families, name):
    """Texture-aligning Attention on a geometry row equal to its target ([K_geo; K_tar] with K_tar = K_geo) gives
    the plain inversion of that row; the latents keep the family's shape (Qwen-Image: one frame of a 5-D latent)."""
    from harmonizing_attention.nodes import pipeline

    model, clip, vae = dit_families[name]
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    scene = _scene(geometry_is_target=True)
    aligned = pipeline.invert(model, vae, cond, scene, steps=2, iterations=2, average_last=1, mode="texture_aligning")
    plain = pipeline.invert(model, vae, cond, scene, steps=2, iterations=2, average_last=1, mode="geometry_only")
    _, channels, _, _ = LAYOUT[name]
    frames = (1,) if name == "tiny-qwen-image" else ()
    cell = 16 if name == "tiny-flux2" else 8
    assert aligned.latents.shape == (3, channels, *frames, 64 // cell, 64 // cell)
    torch.testing.assert_close(aligned.latents, plain.latents, rtol=1e-4, atol=1e-4)


@pytest.mark.usefixtures("needs_vae")
def test_empty_source_mask_samples_as_plain(dit_families, name):
    """Geometry-preserving Attention with an empty source mask adds no source keys: the generation equals the plain
    (self-only) one bit for bit; with the mask drawn it differs. The blend broadcasts over a 5-D latent's frame."""
    from harmonizing_attention.nodes import pipeline

    model, clip, vae = dit_families[name]
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    runs = {}
    for empty in (True, False):
        inverted = pipeline.blend_latents(pipeline.invert(model, vae, cond, _scene(empty_source=empty), 2, 1, 1,
                                                          "texture_aligning"), 0.0)
        assert inverted.blend_mask.ndim == inverted.latents.ndim
        for mode in ("geometry_preserving", "self_only"):
            runs[empty, mode] = pipeline.generate(model, cond, cond, inverted, 1.0, mode)[0]
    assert torch.equal(runs[True, "geometry_preserving"], runs[True, "self_only"])
    assert not torch.equal(runs[False, "geometry_preserving"], runs[False, "self_only"])


@pytest.mark.usefixtures("needs_vae")
def test_shipped_workflow_runs_with_the_tiny_model(dit_families, name):
    """The family's shipped API workflow as it is (UNETLoader + CLIPLoader + VAELoader swapped for the tiny model:
    comfy_server.swap_loaders), a 64 px working region and 1 step: the five nodes, VAEDecode and the detail-preserving
    composite, which keeps the target's own pixels outside its blend band."""
    out = run_shipped_with_tiny_model(f"{WORKFLOW[name]}_geometry_transfer", name)
    assert_shipped_dit_output(out, "22")


@pytest.mark.usefixtures("needs_vae")
def test_nodes_end_to_end_with_cfg_and_a_block_window(dit_families, name):
    """The five nodes with cond and uncond batched (cfg 2) and a block window on the sampler."""
    from test_pipeline import graph

    prompt = graph(ckpt=name, size=64, mask_box=(16, 40, 16, 40), steps=2, renoise_iterations=1)
    prompt["10"]["inputs"].update(cfg=2.0, dit_block_start=0.25, dit_block_end=1.0)
    out = harness.run_prompt(prompt)
    latent = out["10"][0]["samples"]
    assert latent.shape[0] == 1 and latent.shape[-2:] == ((4, 4) if name == "tiny-flux2" else (8, 8))
    assert torch.isfinite(latent).all() and out["11"][0].shape == (1, 64, 64, 3)


@pytest.mark.usefixtures("needs_vae")
def test_what_a_family_cannot_take_is_refused_by_name(dit_families, name):
    """Reference images in the conditioning (Qwen-Image-Edit's / Flux.2's / Z-Image Omni's reference latents) are
    refused before any work; so are Qwen-Image-Layered, a VAE of another family and a size off the pixel step."""
    import node_helpers
    from harmonizing_attention.nodes import families, validate
    from harmonizing_attention.nodes.families import UnsupportedModel

    model, clip, vae = dit_families[name]
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    validate.unet(model)
    validate.vae(model, vae)
    edit = node_helpers.conditioning_set_values(cond, {"reference_latents": [torch.zeros(1, 16, 8, 8)]}, append=True)
    with pytest.raises(ValueError, match="carries reference images .* Connect a plain CLIPTextEncode"):
        validate.inpaint_conditioning_free(edit, "HA_TextureAligningInversion")
    other = harness.tiny_vae(seed=1, z_channels=4)
    with pytest.raises(ValueError, match="the VAE makes 4-channel image latents but this .* model takes"):
        validate.vae(model, other)
    step = 16
    assert families.pixel_step(model) == step
    with pytest.raises(ValueError, match=f"multiples of {step} for the VAE"):
        validate.latent_size("target", torch.zeros(1, 72, 64, 3), model)
    if name == "tiny-qwen-image":
        layered = harness.tiny_qwen_image(seed=1, layers=1)
        layered.model.model_config.unet_config["use_additional_t_cond"] = True
        with pytest.raises(UnsupportedModel, match="Qwen-Image-Layered"):
            validate.unet(layered)


def test_lumina2_needs_a_comfyui_whose_nextdit_names_its_layers(comfy):
    """Lumina Image 2.0 is Z-Image's family (model_base.Lumina2) and loads in 0.3.64 too, but 0.3.64's NextDiT does not
    write block_index into transformer_options, so no layer call could be placed: refused there by name, before any
    work (never a silent no-op); a ComfyUI that loads Z-Image takes it, and the rule acts in its joint layers."""
    import comfyui_version
    from harmonizing_attention.nodes import validate
    from harmonizing_attention.nodes.families import UnsupportedModel
    from harmonizing_attention.nodes.patch import apply_plan

    model = harness.tiny_lumina2(seed=24)
    if harness.family_missing("tiny-z-image"):
        with pytest.raises(UnsupportedModel, match="does not tell its attention which layer runs .* update ComfyUI"):
            validate.unet(model)
        return
    validate.unet(model)
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(3, 16, 8, 10, generator=gen), torch.randn(3, TXT, harness.TINY_CONTEXT_DIM, generator=gen)
    plain = _run(model, x, {"c_crossattn": context, "num_tokens": TXT})
    acting = apply_plan(model, RowPlan(3, lambda layer: texture_aligning_rules(PairLayout(1, 1))))
    out = _run(acting, x, {"c_crossattn": context, "num_tokens": TXT})
    assert torch.equal(out[:2], plain[:2]) and not torch.allclose(out[2], plain[2]), comfyui_version.__version__


@pytest.mark.usefixtures("needs_vae")
def test_appearance_transfer_nodes_with_masks(dit_families, name):
    """Both appearance nodes, cross-image attention in every block and AdaIN inside masks each step: on Qwen-Image the
    statistics are taken per channel of its 5-D latents' one frame."""
    from test_cross_image import graph, with_masks

    prompt = with_masks(graph(ckpt=name, size=64, dit_block_start=0.0, dit_block_end=1.0))
    prompt["5"]["inputs"].update(steps=3, renoise_iterations=1)
    out = harness.run_prompt(prompt)
    latent = out["6"][0]["samples"]
    assert latent.shape[-2:] == ((4, 4) if name == "tiny-flux2" else (8, 8)) and torch.isfinite(latent).all()
    assert out["7"][0].shape == (1, 64, 64, 3)
