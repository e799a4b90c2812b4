"""Both methods on diffusion transformers: tiny random-weight Flux (plain, Fill), Chroma and SD3 (MMDiT with SD3.5
Medium's image-only self-attention in one block), built through ComfyUI's own supported_models classes.

The joint-attention rule is checked in place: a recording override wraps the pack's, and every call it sees is
compared with a naive softmax over the keys the rule names (each row: its own text, then image tokens). Identities
run the models directly and through the pipeline; the flow inversion is checked against closed forms.
"""
import copy

import harness
import pytest
import torch
from harmonizing_attention.attention import inversion
from harmonizing_attention.attention.kv import Ref
from harmonizing_attention.attention.roles import (
    PairLayout,
    RowPlan,
    geometry_preserving_rules,
    texture_aligning_rules,
)
from harmonizing_attention.attention.tokens import region_tokens

pytestmark = pytest.mark.usefixtures("single_thread")

TXT = 7  # context tokens in the direct calls
LATENT = (8, 10)  # latent h, w: a 4 x 5 token grid


@pytest.fixture(scope="module")
def dits(tiny):
    """name -> (MODEL, CLIP, VAE); also reachable from graphs through HATest_TinyCheckpoint."""
    _, clip, _ = tiny["tiny"]
    vae = harness.tiny_vae(seed=7, z_channels=16)
    models = {
        "tiny-flux": (harness.tiny_flux(seed=11, guidance_embed=True, depth=2, single=2), clip, vae),
        "tiny-flux-fill": (harness.tiny_flux(seed=12, in_channels=96, guidance_embed=True), clip, vae),
        "tiny-sd3": (harness.tiny_sd3(seed=13), clip, vae),
        "tiny-chroma": (harness.tiny_chroma(seed=14, depth=2, single=2), clip, vae),
    }
    tiny.update(models)
    return models


def _inputs(name, rows, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 16, *LATENT, generator=gen)
    kwargs = {"c_crossattn": torch.randn(rows, TXT, harness.TINY_CONTEXT_DIM, generator=gen),
              "y": torch.randn(rows, harness.TINY_CONTEXT_DIM, generator=gen)}
    if "fill" in name:
        kwargs["c_concat"] = torch.randn(rows, 80, *LATENT, generator=gen)
    if "flux" in name:
        kwargs["guidance"] = torch.full((rows,), 3.5)
    if "chroma" in name:  # its approximator's guidance input (ComfyUI's default 0)
        kwargs["guidance"] = torch.zeros(rows)
    return x, kwargs


def _run(model, x, kwargs, sigma=0.6, **options):
    to = {**model.model_options["transformer_options"], **options}
    with torch.no_grad():
        return model.model.apply_model(x, torch.full((x.shape[0],), sigma), transformer_options=to, **kwargs)


def _recorder(patched, calls, where=None):
    """Wrap the installed override (the pack's) to record each call's block, q, k, v, heads, layout and output; the
    block: where(transformer_options), by default the DitBlock the pack's block replace put there (None outside)."""
    from harmonizing_attention.nodes.patch import BLOCK_KEY

    ours = patched.model_options["transformer_options"]["optimized_attention_override"]
    where = where or (lambda options: options.get(BLOCK_KEY))

    def record(func, *args, **kwargs):
        out = ours(func, *args, **kwargs)
        block = where(kwargs["transformer_options"])
        heads = args[3] if len(args) > 3 else kwargs["heads"]
        calls.append((block, args[:3], heads, kwargs.get("skip_reshape", False), out))
        return out

    clone = patched.clone()
    clone.model_options["transformer_options"]["optimized_attention_override"] = record
    return clone


def _heads_layout(t, heads, skip_reshape):
    return t.transpose(1, 2) if skip_reshape else t.reshape(t.shape[0], t.shape[1], heads, -1)


def _naive(q, k, v, rules, regions, image):
    """softmax(q K^T / sqrt(d)) V per row and head, K/V the keys the row's rule names (float64)."""
    start, stop = image
    n = k.shape[1]
    own_other = [i for i in range(n) if not start <= i < stop]
    out = []
    for r, refs in enumerate(rules):
        if refs is None:
            keys = [(r, list(range(n)))]
        else:
            keys = [] if Ref(r) in refs else [(r, own_other)]
            for ref in refs:
                if ref.region_only:
                    keys.append((ref.row, [start + int(i) for i in regions[ref.row].nonzero()]))
                else:
                    keys.append((ref.row, list(range(n))))
        kk = torch.cat([k[row, idx] for row, idx in keys]).double()  # [keys, heads, d]
        vv = torch.cat([v[row, idx] for row, idx in keys]).double()
        qq = q[r].double()
        w = torch.softmax(torch.einsum("nhd,khd->hnk", qq, kk) / qq.shape[-1] ** 0.5, dim=-1)
        out.append(torch.einsum("hnk,khd->nhd", w, vv))
    return torch.stack(out)


@pytest.mark.parametrize("name, kinds", [
    ("tiny-flux", {("double_block", 27), ("single_block", 27)}),
    ("tiny-flux-fill", {("double_block", 27), ("single_block", 27)}),
    ("tiny-sd3", {("double_block", 27), ("double_block", 20)}),  # joint attention, and image-only self-attention
    ("tiny-chroma", {("double_block", 27), ("single_block", 27)}),
])
def test_joint_attention_equals_naive_reference_at_every_block_kind(dits, name, kinds):
    """Three rows per chunk, cond and uncond batched ([1, 0]): row 0 plain, row 1 [own; row 0's image tokens in its
    region] (eq. 5), row 2 [its own text; row 0 whole]. Every attention call matches the naive reference; the text
    and image split comes from the model (context length, patchified latent grid)."""
    n = (LATENT[0] // 2) * (LATENT[1] // 2)

    def span(block, tokens):
        assert block is not None  # every call is in a patched block
        return (0, n) if tokens == n else (TXT, TXT + n)

    seen = assert_rule_equals_naive(dits[name][0], lambda rows: _inputs(name, rows), (LATENT[0] // 2, LATENT[1] // 2),
                                    span)
    assert {(block.kind, tokens) for block, tokens in seen} == kinds


def assert_rule_equals_naive(model, inputs, grid: tuple[int, int], span, where=None) -> set:
    """Run the three rows of test_joint_attention_equals_naive_reference_at_every_block_kind, cond and uncond batched,
    through the patched model; every attention call must equal the naive reference: under the rules where
    span(block, tokens) gives the call's image span, plain attention where it gives None. inputs(rows) -> (x, kwargs);
    grid: the image tokens' (h, w); block: where(transformer_options) (_recorder). Returns {(block, tokens)} seen."""
    from harmonizing_attention.nodes.patch import apply_plan

    h, w = grid
    mask = torch.zeros(3, 40, 50)
    mask[0, 8:24, 10:30] = 1.0
    rules = [None, (Ref(1), Ref(0, region_only=True)), (Ref(0),)]
    patched = apply_plan(model, RowPlan(3, lambda layer: rules, regions=mask))
    calls = []
    x, kwargs = inputs(3)
    x = torch.cat([x, x.flip(0)])
    kwargs = {k: torch.cat([v, v.flip(0)]) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    _run(_recorder(patched, calls, where), x, kwargs, cond_or_uncond=[1, 0])
    regions = {r: region_tokens(mask[r % 3: r % 3 + 1], h, w)[0] for r in range(6)}
    assert regions[0].sum() not in (0, h * w)
    shifted = [None if r is None else tuple(Ref(ref.row + c * 3, ref.region_only) for ref in r)
               for c in range(2) for r in rules]
    seen = set()
    for block, (q, k, v), heads, skip, out in calls:
        q, k, v = (_heads_layout(t, heads, skip) for t in (q, k, v))
        tokens = q.shape[1]
        image = span(block, tokens)
        seen.add((block, tokens))
        expect = _naive(q, k, v, shifted if image else [None] * len(shifted), regions, image or (0, 0))
        got = out.reshape(expect.shape[0], tokens, heads, -1)
        torch.testing.assert_close(got.double(), expect, atol=2e-5, rtol=1e-4)
    return seen


def assert_identities(model, inputs):
    """Self-only / geometry-only modes and an empty source mask give the unpatched model bit for bit; a block window
    excluding every block too; an acting rule changes its row only; the input MODEL keeps its options.
    inputs(rows) -> (x, the model's keyword inputs) of a direct call."""
    from harmonizing_attention.nodes.patch import apply_plan

    options = copy.deepcopy(model.model_options)
    layout = PairLayout(1, 1)
    x, kwargs = inputs(2)
    plain = _run(model, x, kwargs)
    empty = torch.zeros(2, 40, 50)
    for plan in (RowPlan(2, lambda layer: geometry_preserving_rules(layout, "self_only")),
                 RowPlan(2, lambda layer: geometry_preserving_rules(layout), regions=empty),
                 RowPlan(2, lambda layer: geometry_preserving_rules(layout, "source_only"), regions=empty)):
        assert torch.equal(_run(apply_plan(model, plan), x, kwargs), plain)
    x3, kwargs3 = inputs(3)
    plain3 = _run(model, x3, kwargs3)
    ta = RowPlan(3, lambda layer: texture_aligning_rules(layout, "geometry_only"))
    assert torch.equal(_run(apply_plan(model, ta), x3, kwargs3), plain3)
    acting = RowPlan(3, lambda layer: texture_aligning_rules(layout))
    assert torch.equal(_run(apply_plan(model, acting, (1.0, 1.0)), x3, kwargs3), plain3)
    out = _run(apply_plan(model, acting), x3, kwargs3)
    assert torch.equal(out[:2], plain3[:2]) and not torch.allclose(out[2], plain3[2])
    assert model.model_options == options
    assert "optimized_attention_override" not in model.model_options["transformer_options"]


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-flux-fill", "tiny-sd3", "tiny-chroma"])
def test_identities_and_input_model_unchanged(dits, name):
    assert_identities(dits[name][0], lambda rows: _inputs(name, rows))


def test_block_window_patches_blocks_by_depth(dits):
    """Flux's 2 double + 2 single blocks sit at depths 0, 1/4, 1/2, 3/4: [0.5, 1) patches the single ones only."""
    from harmonizing_attention.nodes.patch import apply_plan

    model = dits["tiny-flux"][0]
    layout = PairLayout(1, 1)
    patched = apply_plan(model, RowPlan(3, lambda layer: texture_aligning_rules(layout)), (0.5, 1.0))
    assert set(patched.model_options["transformer_options"]["patches_replace"]["dit"]) == {
        ("single_block", 0), ("single_block", 1)}
    calls = []
    x, kwargs = _inputs("tiny-flux", 3)
    _run(_recorder(patched, calls), x, kwargs)
    blocks = [c[0] for c in calls]
    assert blocks[:2] == [None, None]
    assert [(b.kind, b.index, b.depth) for b in blocks[2:]] == [("single_block", 0, 0.5), ("single_block", 1, 0.75)]
    with pytest.raises(ValueError, match="DiT block window is 0.8-0.2"):
        apply_plan(model, RowPlan(3, lambda layer: [None] * 3), (0.8, 0.2))


def test_coexists_with_another_override_and_dit_patch(dits):
    """An override installed before ours (counting calls, scaling outputs) and a dit block replace both keep
    running; plain rows get the other override's result exactly, so with identity rules the output is the other
    patches' alone, bit for bit."""
    from harmonizing_attention.nodes.patch import apply_plan

    model = dits["tiny-flux"][0]
    counts = {"attention": 0, "block": 0}

    def other_override(func, *args, **kwargs):
        counts["attention"] += 1
        return func(*args, **kwargs) * 0.9

    def other_block(args, extra):
        counts["block"] += 1
        return extra["original_block"](args)

    theirs = model.clone()
    theirs.model_options["transformer_options"]["optimized_attention_override"] = other_override
    theirs.set_model_patch_replace(other_block, "dit", "double_block", 1)
    layout = PairLayout(1, 1)
    x, kwargs = _inputs("tiny-flux", 3)
    alone = _run(theirs, x, kwargs)
    assert counts == {"attention": 4, "block": 1}
    identity = apply_plan(theirs, RowPlan(3, lambda layer: texture_aligning_rules(layout, "geometry_only")))
    assert torch.equal(_run(identity, x, kwargs), alone)
    assert counts == {"attention": 8, "block": 2}
    acting = apply_plan(theirs, RowPlan(3, lambda layer: texture_aligning_rules(layout)))
    out = _run(acting, x, kwargs)
    assert counts == {"attention": 12, "block": 3}
    assert torch.equal(out[:2], alone[:2]) and not torch.allclose(out[2], alone[2])


# ---------------------------------------------------------------- rectified-flow inversion


def test_flow_step_and_renoise_fixed_point_closed_form():
    """On a flow model x_s = (1 - s) x0 + s n with velocity v(x, s) = a x (x0_hat = x - s v, as ComfyUI's CONST
    sampling returns), our step is explicit Euler: x_N = x_0 prod(1 + a h_i); ReNoise converges to backward Euler,
    x_N = x_0 prod 1 / (1 - a h_i); both approach the exact flow x_0 exp(a (s_N - s_0))."""
    a = 0.7
    sigmas = torch.linspace(1e-4, 1.0, 9, dtype=torch.float64)
    x0 = torch.randn(2, 16, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def denoise(x, s):
        return x - s.reshape(-1, 1, 1, 1) * (a * x)

    h = sigmas.diff()
    euler = inversion.invert(denoise, x0, sigmas, iterations=1)
    torch.testing.assert_close(euler, x0 * torch.prod(1 + a * h), rtol=1e-12, atol=0)
    implicit = inversion.invert(denoise, x0, sigmas, iterations=40)
    torch.testing.assert_close(implicit, x0 * torch.prod(1 / (1 - a * h)), rtol=1e-10, atol=0)
    exact = x0 * torch.exp(torch.tensor(a * (1.0 - 1e-4), dtype=torch.float64))
    assert (euler - exact).abs().max() < 0.1 * exact.abs().max() and (implicit - exact).abs().max() < 0.1 * exact.abs().max()
    # each implicit step is a fixed point: x' = x + h v(x', s')
    step = inversion.invert(denoise, x0, sigmas[:2], iterations=40)
    torch.testing.assert_close(step, x0 + h[0] * a * step, rtol=1e-12, atol=1e-14)
    # sampling back down with Euler: prod(1 - a h_i)
    back = inversion.sample(denoise, euler, sigmas.flip(0))
    torch.testing.assert_close(back, euler * torch.prod(1 - a * h), rtol=1e-12, atol=0)


def test_flow_inversion_through_comfyui_matches_closed_form(dits):
    """The same controlled velocity as the network output of a tiny Flux (a DIFFUSION_MODEL wrapper), run by
    pipeline.invert_latents through ComfyUI's sampler: Flux's latent scaling, CONST model sampling and the flow
    schedule are ComfyUI's; the latent is inverted up to sigma 1 without being rescaled on the way in or out."""
    import comfy.samplers
    from harmonizing_attention.nodes import pipeline

    model = dits["tiny-flux"][0]
    a = 0.5
    sampling = model.get_model_object("model_sampling")

    def network(executor, x, timesteps, *args, **kwargs):
        return a * x

    wrapped = harness.with_diffusion_wrapper(model, "ha-test-velocity", network)
    sigmas = pipeline.schedule(model, 4)
    expect = comfy.samplers.calculate_sigmas(sampling, "simple", 4).cpu()
    assert torch.equal(sigmas, expect) and float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0
    latent = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    cond = [[torch.zeros(1, TXT, harness.TINY_CONTEXT_DIM), {"pooled_output": torch.zeros(1, 32)}]]
    z = pipeline.invert_latents(wrapped, latent, sigmas, cond, iterations=1, average_last=1)
    up = sigmas.flip(0).double()
    up[0] = 1e-4
    fmt = model.model.latent_format
    xm = (latent.double() - fmt.shift_factor) * fmt.scale_factor
    expect = xm * torch.prod(1 + a * up.diff())
    # float32: at the first sigma (1e-4) x - x0_hat = 1e-4 * v cancels ~4 of float32's 7 digits
    torch.testing.assert_close(z.double(), expect / fmt.scale_factor + fmt.shift_factor, rtol=2e-3, atol=2e-3)
    # 3 ReNoise iterations of x' = x + h a x': each step multiplies by 1 + ah + (ah)^2 + (ah)^3
    renoised = pipeline.invert_latents(wrapped, latent, sigmas, cond, iterations=3, average_last=1)
    ah = a * up.diff()
    expect = xm * torch.prod(1 + ah + ah ** 2 + ah ** 3)
    torch.testing.assert_close(renoised.double(), expect / fmt.scale_factor + fmt.shift_factor, rtol=2e-3, atol=2e-3)
    assert (renoised - z).abs().max() > 0.05
    assert torch.isfinite(z).all()


# ---------------------------------------------------------------- the pipeline and the nodes


def _scene(size=32, pairs=1, geometry_is_target=False):
    from harmonizing_attention.nodes.pipeline import Scene

    gen = torch.Generator().manual_seed(3)
    source = torch.rand(1, size, size, 3, generator=gen)
    target = torch.rand(pairs, size, size, 3, generator=gen)
    mask = torch.zeros(1, size, size)
    mask[:, 8:20, 10:22] = 1.0
    geometry = target.clone() if geometry_is_target else torch.rand(pairs, size, size, 3, generator=gen)
    return Scene(source=source, source_mask=mask, target=target, geometry=geometry, geometry_mask=mask.expand(pairs, -1, -1))


@pytest.mark.parametrize("name", ["tiny-flux-fill", "tiny-sd3"])
def test_geometry_identical_to_target_inverts_as_plain(dits, name):
    """Texture-aligning Attention on a geometry row equal to its target ([K_geo; K_tar] with K_tar = K_geo) gives
    the plain inversion of that row; for Flux Fill each row carries its own masked image and mask."""
    from harmonizing_attention.nodes import pipeline

    model, clip, vae = dits[name]
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    scene = _scene(geometry_is_target=True)
    aligned = pipeline.invert(model, vae, cond, scene, steps=2, iterations=2, average_last=1, mode="texture_aligning")
    plain = pipeline.invert(model, vae, cond, scene, steps=2, iterations=2, average_last=1, mode="geometry_only")
    assert aligned.latents.shape == (3, 16, 4, 4)
    torch.testing.assert_close(aligned.latents, plain.latents, rtol=1e-4, atol=1e-4)
    assert (aligned.inpaint_latents is not None) == (name == "tiny-flux-fill")
    assert aligned.guidance == (3.5 if name == "tiny-flux-fill" else None)


def test_flux_guidance_is_kept_from_inversion_to_sampling(dits):
    from harmonizing_attention.nodes import pipeline

    model, clip, vae = dits["tiny-flux"]
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    import node_helpers

    at_2 = node_helpers.conditioning_set_values(cond, {"guidance": 2.0})
    inverted = pipeline.blend_latents(pipeline.invert(model, vae, at_2, _scene(), 2, 1, 1, "texture_aligning"), 0.0)
    assert inverted.guidance == 2.0
    seen = []

    def record(executor, x, timesteps, context, y, guidance, *args, **kwargs):
        seen.append(float(guidance.unique()))
        return executor(x, timesteps, context, y, guidance, *args, **kwargs)

    wrapped = harness.with_diffusion_wrapper(model, "ha-test-guidance", record)
    out, src = pipeline.generate(wrapped, cond, cond, inverted, 1.0, "geometry_preserving")
    assert set(seen) == {2.0} and torch.isfinite(out).all()
    from harmonizing_attention.nodes import appearance

    app = appearance.invert(model, vae, at_2, _scene().target, _scene().source, 2, 1.0, 1, 1)
    assert app.guidance == 2.0
    with pytest.raises(ValueError, match="guidance 5.0 but the images were inverted at 2.0"):
        appearance.generate(model, node_helpers.conditioning_set_values(cond, {"guidance": 5.0}), cond, app, 1.0,
                            appearance.CrossImageSchedule(steps=2), 1.0, False)
    at_5 = node_helpers.conditioning_set_values(cond, {"guidance": 5.0})
    with pytest.raises(ValueError, match="positive conditioning has Flux guidance 5.0 but the images were inverted at 2.0"):
        pipeline.generate(model, at_5, cond, inverted, 1.0, "geometry_preserving")


def _graph(ckpt, **sampler):
    from test_pipeline import graph

    prompt = graph(ckpt=ckpt, size=32, mask_box=(8, 20, 8, 20), steps=2, renoise_iterations=1)
    prompt["10"]["inputs"].update(sampler)
    return prompt


def test_a_rerun_replays_the_sources_generation_bit_for_bit(dits, tiny):
    """Tiny Flux through ComfyUI's executor: a re-run with the geometry moved reuses the source's inversion and its
    recorded generation (the joint attention's image tokens in the source mask, per block and step), evaluates only
    [target, geometry] and the output, and equals a run from an empty cache bit for bit. Above the reuse cache's
    budget the generation runs as one [source, output] batch, unrecorded, within float tolerance of the replay."""
    reuse = harness.loaded("reuse")
    model, clip, vae = dits["tiny-flux"]
    rows: list[int] = []

    def spy(executor, x, *args, **kwargs):
        rows.append(x.shape[0])
        return executor(x, *args, **kwargs)

    tiny["tiny-flux-spied"] = (harness.with_diffusion_wrapper(model, "ha-test-dit-spy", spy), clip, vae)
    prompt = _graph("tiny-flux-spied")
    prompt["8"]["inputs"]["renoise_iterations"] = 2

    def run():
        rows.clear()
        return harness.run_prompt(prompt)["11"][0]

    reuse.CACHE.clear()
    run()
    first = list(rows)
    prompt["6"]["inputs"]["shift_x"] = 0.0
    hits = reuse.CACHE.hits
    moved = run()
    # 2 steps x 2 ReNoise evaluations of the source, of [target, geometry]; 2 steps of the source, of the output
    assert first == [1] * 4 + [2] * 4 + [1] * 2 + [1] * 2
    assert rows == [2] * 4 + [1] * 2 and reuse.CACHE.hits == hits + 2  # the source's inversion and generation
    reuse.CACHE.clear()
    assert torch.equal(moved, run()) and rows == first
    budget = reuse.CACHE.budget
    try:
        reuse.CACHE.budget = 1
        rows.clear()
        executor = harness.comfy_runtime.new_executor()
        joint = harness.run_prompt(prompt, executor)["11"][0]
    finally:
        reuse.CACHE.budget = budget
    assert rows == [2] * 4 + [2] * 2  # the source's inversion still reused; [source, output] at each step
    said = "\n".join(executor.history_result["outputs"]["10"]["text"])
    assert "recording" in said and "exceeds the reuse cache" in said, said  # the sampler says so
    assert 0 < (joint - moved).abs().max() < 1e-4


@pytest.mark.parametrize("ckpt", ["tiny-flux-fill", "tiny-sd3", "tiny-chroma"])
def test_geometry_transfer_nodes_end_to_end_with_cfg(dits, ckpt):
    """The five nodes on a DiT, cond and uncond batched (cfg 2), a block window on the sampler."""
    out = harness.run_prompt(_graph(ckpt, cfg=2.0, dit_block_start=0.25, dit_block_end=1.0))
    latent, source = out["10"][0]["samples"], out["10"][1]["samples"]
    assert latent.shape == source.shape == (1, 16, 4, 4)
    assert torch.isfinite(latent).all() and out["11"][0].shape == (1, 32, 32, 3)
    with pytest.raises(harness.PromptError, match="dit_block_start is 0.9 but dit_block_end is 0.1"):
        harness.run_prompt(_graph(ckpt, dit_block_start=0.9, dit_block_end=0.1))


def test_appearance_transfer_nodes_on_flux(dits):
    """Both appearance nodes on a guidance-distilled Flux, cross-image attention in every block."""
    from test_cross_image import graph

    prompt = graph(ckpt="tiny-flux", size=32, dit_block_start=0.0, dit_block_end=1.0)
    prompt["5"]["inputs"].update(steps=3, renoise_iterations=1)
    out = harness.run_prompt(prompt)
    latent = out["6"][0]["samples"]
    assert latent.shape == (1, 16, 4, 4) and torch.isfinite(latent).all()


@pytest.mark.parametrize("name", ["flux_fill_geometry_transfer", "sd3_geometry_transfer"])
def test_shipped_dit_workflows_run_with_tiny_models(dits, name):
    """The shipped API twins as they are, loaders swapped for the tiny Flux Fill / SD3 (comfy_server.swap_loaders),
    a 64 px working region (the model's canvas) and 1 step; the UI twins convert to them (test_pipeline checks every
    workflow). The saved image is the detail-preserving composite: the 512 px target's own pixels outside its blend
    band."""
    out = run_shipped_with_tiny_model(name, "tiny-flux-fill" if "flux" in name else "tiny-sd3")
    assert_shipped_dit_output(out, "22" if "flux" in name else "19")


def assert_shipped_dit_output(out: dict, composite: str) -> None:
    """A shipped DiT workflow's outputs (run_shipped_with_tiny_model): decoded at the working canvas, and the saved
    composite the 512 px target's own pixels outside its blend band."""
    decoded, canvas = out["11"][0], out["7"][1].window.canvas_hw
    assert decoded.shape == (1, *canvas, 3) and max(canvas) <= 96 and torch.isfinite(decoded).all()
    image, band = out[composite]
    assert image.shape == (1, 512, 512, 3) and harness.composite_keeps_target(image, band, out["5"][0])


def run_shipped_with_tiny_model(name: str, tiny: str) -> dict:
    """Each node's outputs of workflows/api/<name>.json run as it is, its loaders swapped for the test pack's `tiny`
    model (comfy_server.swap_loaders), a 64 px working region instead of its 1024 px one, and 1 step."""
    import json

    import comfy_server
    from test_pipeline import shipped

    shipped(f"api/{name}.json")  # the example images in the input folder
    prompt = comfy_server.swap_loaders(json.loads((harness.PACK_ROOT / "workflows" / "api" / f"{name}.json").read_text()))
    assert {n["inputs"]["ckpt_name"] for n in prompt.values() if n["class_type"] == "HATest_TinyCheckpoint"} == {tiny}
    for node in prompt.values():
        if node["class_type"] == "HA_GeometryImageEdit":
            assert node["inputs"]["working_size"] == 1024
            node["inputs"]["working_size"] = 64
        if node["class_type"] == "HA_TextureAligningInversion":
            node["inputs"].update(steps=1, renoise_iterations=1)
    return harness.run_prompt(prompt)


def test_families_the_dit_path_cannot_take_are_refused_by_name(dits):
    """A Flux control model (32 channels: latent + control image) and PixArt (attention bypassing
    transformer_options) stop at the first node; a 72 px image (an odd 9-cell latent) is refused for a DiT."""
    from harmonizing_attention.nodes import validate
    from harmonizing_attention.nodes.patch import UnsupportedModel

    with pytest.raises(UnsupportedModel, match="takes 32 input channels: a Flux control model"):
        validate.unet(harness.tiny_flux(in_channels=32))
    with pytest.raises(UnsupportedModel, match="this model is PixArtAlpha .* Flux.1 .* SD3.x"):
        validate.unet(harness.tiny_pixart())
    validate.unet(dits["tiny-sd3"][0])
    with pytest.raises(ValueError, match="multiples of 16 for the VAE and the 2x2 patches of the model"):
        validate.latent_size("target", torch.zeros(1, 72, 64, 3), dits["tiny-flux"][0])
