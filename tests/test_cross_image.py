"""Cross-Image Attention (appearance transfer): contrast, rules, guidance, AdaIN against naive formulas,
identities on the real UNet through ComfyUI, and the nodes through the executor."""
import json
from pathlib import Path

import harness
import pytest
import torch
from harmonizing_attention.attention.appearance import (
    AppearanceLayout,
    CrossImageRules,
    CrossImageSchedule,
    appearance_guidance,
    masked_adain,
)
from harmonizing_attention.attention.kv import Ref, contrast_attention, reference_attention, shared_attention
from harmonizing_attention.attention.roles import Layer, RowPlan

HEADS = 2
LAYOUT = AppearanceLayout(1)
APP, STRUCT, OUT = LAYOUT.app(0), LAYOUT.struct(0), LAYOUT.out(0)


def sdpa_kernel(q, k, v):
    b, n, c = q.shape
    qh, kh, vh = (t.reshape(t.shape[0], t.shape[1], HEADS, -1).transpose(1, 2) for t in (q, k, v))
    return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(b, n, c)


def naive_contrast(q, k, v, heads, beta, clip=False):
    """Eq. 2 + 3 literally: the explicit map softmax(q k^T / sqrt d), (A - mean A) beta + mean A, then A v.
    q [N, C], k, v [M, C]."""
    d = q.shape[-1] // heads
    split = lambda t: t.reshape(t.shape[0], heads, d).transpose(0, 1).double()  # noqa: E731
    qh, kh, vh = split(q), split(k), split(v)
    a = torch.softmax(qh @ kh.transpose(-1, -2) / d ** 0.5, dim=-1)
    mean = torch.full_like(a, 1.0 / k.shape[0])  # a softmax row sums to 1: its mean is 1 / keys
    a = (a - mean) * beta + mean
    if clip:
        a = a.clamp(0, 1)
    return (a @ vh).transpose(0, 1).reshape(q.shape[0], -1).float()


def paper_schedule(steps=100, **kw):
    return CrossImageSchedule(steps=steps, **kw)


# ---------------------------------------------------------------- attention math

@pytest.mark.parametrize("clip", [False, True])
def test_cross_image_attention_with_contrast_equals_naive_reference(clip):
    torch.manual_seed(0)
    q, k, v = (torch.randn(LAYOUT.rows, 64, 16) for _ in range(3))
    plan = RowPlan(LAYOUT.rows, CrossImageRules(LAYOUT, paper_schedule()), needs_step=True, contrast=1.67,
                   contrast_clip=clip)
    rules = plan.rules(Layer("output", 1, step=0.11))
    assert rules == [None, None, (Ref(APP),)]
    out = shared_attention(q, k, v, rules, sdpa_kernel, ref_kernel=plan.ref_kernel(HEADS))
    torch.testing.assert_close(out[OUT], naive_contrast(q[OUT], k[APP], v[APP], HEADS, 1.67, clip), rtol=1e-5,
                               atol=1e-5)
    for row in (APP, STRUCT):  # the reconstruction rows keep plain self-attention
        torch.testing.assert_close(out[row:row + 1], reference_attention(q[row:row + 1], k[row:row + 1],
                                                                          v[row:row + 1], HEADS), rtol=1e-5, atol=1e-5)
    # query chunking does not change the result
    whole = contrast_attention(q[:1], k[:1], v[:1], HEADS, 1.67, chunk=4096, clip=clip)
    torch.testing.assert_close(contrast_attention(q[:1], k[:1], v[:1], HEADS, 1.67, chunk=7, clip=clip), whole)
    if not clip:  # the clamp matters: some contrasted weights are negative
        assert not torch.allclose(whole, contrast_attention(q[:1], k[:1], v[:1], HEADS, 1.67, clip=True))


def test_beta_one_is_no_contrast():
    torch.manual_seed(1)
    q, k, v = (torch.randn(LAYOUT.rows, 48, 16) for _ in range(3))
    plan = RowPlan(LAYOUT.rows, CrossImageRules(LAYOUT, paper_schedule()), needs_step=True, contrast=1.0,
                   contrast_clip=True)
    assert plan.ref_kernel(HEADS) is None  # the host's own kernel
    out = shared_attention(q, k, v, plan.rules(Layer("output", 2, step=0.5)), sdpa_kernel,
                           ref_kernel=plan.ref_kernel(HEADS))
    torch.testing.assert_close(out[OUT:OUT + 1], reference_attention(q[OUT:OUT + 1], k[APP:APP + 1],
                                                                      v[APP:APP + 1], HEADS), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(contrast_attention(q, k, v, HEADS, 1.0), reference_attention(q, k, v, HEADS),
                               rtol=1e-5, atol=1e-5)


def test_rules_follow_the_schedule_by_stage_resolution_and_step():
    """Paper defaults over 100 steps: 64x64 (downscale 1) steps 10-89, 32x32 (downscale 2) steps 10-69,
    structure injection at steps 10, 15, ... 35; encoder, middle and coarser layers never."""
    schedule = paper_schedule()
    rules = CrossImageRules(LAYOUT, schedule)
    windows = {1: range(10, 90), 2: range(10, 70)}
    for i in range(100):
        for stage in ("input", "middle", "output"):
            for downscale in (1, 2, 4, 8):
                got = rules(Layer(stage, downscale, step=i / 100))
                assert got[APP] is None and got[STRUCT] is None
                if stage == "output" and i in windows.get(downscale, ()):
                    expect = (Ref(STRUCT),) if i % 5 == 0 and i < 40 else (Ref(APP),)
                    assert got[OUT] == expect, (i, stage, downscale)
                else:
                    assert got[OUT] is None, (i, stage, downscale)
        assert schedule.active(i) == (10 <= i < 90)
        assert schedule.adain_after(i) == (i >= 20)
    with rules.plain():
        assert rules(Layer("output", 1, step=0.5)) == [None] * 3
    assert rules(Layer("output", 1, step=0.5))[OUT] == (Ref(APP),)
    assert rules(Layer("output", 1, step=None)) == [None] * 3
    no_injection = CrossImageRules(LAYOUT, paper_schedule(injection_period=0))
    assert all(no_injection(Layer("output", 1, step=i / 100))[OUT] in (None, (Ref(APP),)) for i in range(100))
    two = AppearanceLayout(2)
    got = CrossImageRules(two, paper_schedule())(Layer("output", 1, step=0.51))
    assert got == [None, None, None, None, (Ref(two.app(0)),), (Ref(two.app(1)),)]


def test_guidance_schedule_and_bad_values():
    assert appearance_guidance(torch.ones(2), torch.zeros(2), 0.0).eq(1).all()
    eps_self, eps_cross = torch.randn(5), torch.randn(5)
    assert torch.equal(appearance_guidance(eps_self, eps_cross, 1.0), eps_cross)
    torch.testing.assert_close(appearance_guidance(eps_self, eps_cross, 3.5), eps_self + 3.5 * (eps_cross - eps_self))
    constant = paper_schedule(alpha=3.5)
    assert {constant.guidance(i) for i in range(100)} == {3.5}
    decay = paper_schedule(alpha=3.5, alpha_decay=True)
    assert decay.guidance(0) == 3.5 and decay.guidance(99) == pytest.approx(1.75)  # official: linspace(a, a/2)
    assert paper_schedule(alpha=1.5, alpha_decay=True).guidance(99) == pytest.approx(1.0)  # floored at 1
    assert {paper_schedule(alpha=a, alpha_decay=True).guidance(i) for a in (0.0, 1.0) for i in (0, 50, 99)} == {0, 1}
    with pytest.raises(ValueError, match="starts at 0.7 after it ends at 0.1"):
        CrossImageSchedule(steps=10, windows={1: (0.7, 0.1)})
    with pytest.raises(ValueError, match="between 0 and 1"):
        CrossImageSchedule(steps=10, adain=(0.2, 1.5))


def test_masked_adain_equals_its_formula_inside_and_leaves_outside_alone():
    torch.manual_seed(2)
    content, style = torch.randn(2, 4, 8, 8) * 3 + 1, torch.randn(2, 4, 8, 8) * 0.5 - 2
    cm = torch.zeros(2, 8, 8, dtype=torch.bool)
    cm[0, 2:6, 1:5] = True
    cm[1, 4:, :] = True
    sm = torch.zeros(2, 8, 8, dtype=torch.bool)
    sm[0, :4] = True
    sm[1, 1:7, 2:6] = True
    out = masked_adain(content, style, cm, sm)
    eps = 1e-5
    for b in range(2):
        c, s = content[b][:, cm[b]].double(), style[b][:, sm[b]].double()
        mu_c, sd_c = c.mean(1, keepdim=True), (c.var(1, unbiased=False, keepdim=True) + eps).sqrt()
        mu_s, sd_s = s.mean(1, keepdim=True), (s.var(1, unbiased=False, keepdim=True) + eps).sqrt()
        torch.testing.assert_close(out[b][:, cm[b]].double(), (c - mu_c) / sd_c * sd_s + mu_s)
        assert torch.equal(out[b][:, ~cm[b]], content[b][:, ~cm[b]])  # outside: untouched
        inside = out[b][:, cm[b]].double()  # and inside, the style region's statistics
        torch.testing.assert_close(inside.mean(1), s.mean(1))
        torch.testing.assert_close(inside.std(1, unbiased=False), s.std(1, unbiased=False), rtol=1e-4, atol=1e-4)
    whole = masked_adain(content, style)  # no masks: plain AdaIN over the whole latents
    mu_c, sd_c = content.mean((2, 3), keepdim=True), (content.var((2, 3), unbiased=False, keepdim=True) + eps).sqrt()
    mu_s, sd_s = style.mean((2, 3), keepdim=True), (style.var((2, 3), unbiased=False, keepdim=True) + eps).sqrt()
    torch.testing.assert_close(whole, (content - mu_c) / sd_c * sd_s + mu_s)
    with pytest.raises(ValueError, match="empty"):
        masked_adain(content, style, torch.zeros(2, 8, 8, dtype=torch.bool))


# ---------------------------------------------------------------- the patch on the real UNet

def _at_step(extra, rows, schedule_sigmas, i):
    return {**extra, "sigmas": schedule_sigmas[i].repeat(rows), "sample_sigmas": schedule_sigmas}


@torch.no_grad()
def test_patch_on_recorded_qkv_follows_windows_and_resolutions(tiny):
    """Every attn1 call of the tiny UNet (16x16 and 8x8 token grids for a 16x16 latent), replayed at chosen
    steps: inside a window, decoder, finest two resolutions -> contrast attention on the appearance keys;
    everywhere else exactly the host's plain attention."""
    from comfy.ldm.modules.attention import optimized_attention
    from harmonizing_attention.nodes.patch import make_replace
    from test_attention import _recorded_attn1_calls

    torch.manual_seed(3)
    x = torch.randn(LAYOUT.rows, 4, 16, 16)
    context = torch.randn(LAYOUT.rows, 77, 32)
    calls = _recorded_attn1_calls(tiny["tiny"][0], x, context)
    assert {(extra["block"][0], tuple(extra["activations_shape"][-2:])) for *_, extra in calls} >= {
        ("output", (16, 16)), ("output", (8, 8)), ("input", (16, 16))}
    steps = 20
    sigmas = torch.linspace(10.0, 0.0, steps + 1)
    schedule = paper_schedule(steps=steps, windows={1: (0.1, 0.9), 2: (0.1, 0.5)})
    replace = make_replace(RowPlan(LAYOUT.rows, CrossImageRules(LAYOUT, schedule), needs_step=True, contrast=1.67))
    checked = {"cross": 0, "struct": 0, "plain": 0}
    for q, k, v, extra in calls:
        downscale = 16 // extra["activations_shape"][-1]
        for i in (0, 1, 2, 3, 5, 9, 10, 12, 17, 18, 19):
            out = replace(q, k, v, _at_step(extra, q.shape[0], sigmas, i))
            window = {1: (2, 18), 2: (2, 10)}.get(downscale, (0, 0))
            if extra["block"][0] == "output" and window[0] <= i < window[1]:
                ref = STRUCT if i % 5 == 0 and i < 8 else APP
                checked["struct" if ref == STRUCT else "cross"] += 1
                torch.testing.assert_close(out[OUT], naive_contrast(q[OUT], k[ref], v[ref], extra["n_heads"], 1.67),
                                           rtol=1e-4, atol=1e-5)
                plain = optimized_attention(q[:2], k[:2], v[:2], extra["n_heads"])
                torch.testing.assert_close(out[:2], plain, rtol=1e-5, atol=1e-6)
            else:
                checked["plain"] += 1
                assert torch.equal(out, optimized_attention(q, k, v, extra["n_heads"]))
    assert all(checked.values()), checked


# ---------------------------------------------------------------- the guider through ComfyUI's sampler

def _predictions(model, latents, sigmas, positive, guider=None, plain_model=None):
    """x0 predictions at every sigma of `sigmas` for fixed `latents`, through pipeline.run_sampler (and a guider)."""
    from harmonizing_attention.nodes import pipeline

    seen = []

    def loop(denoise, x, s, callback):
        for i in range(len(s) - 1):
            seen.append(denoise(x, s[i]).clone())
        return x

    pipeline.run_sampler(model, loop, latents, sigmas, positive, positive, 1.0, guider=guider)
    return seen


@torch.no_grad()
def test_guider_alpha_identities(tiny):
    import copy

    from harmonizing_attention.nodes.appearance import CrossImageGuider
    from harmonizing_attention.nodes.patch import apply_plan

    model = tiny["tiny"][0]
    options = copy.deepcopy(model.model_options)
    torch.manual_seed(4)
    latents = torch.randn(LAYOUT.rows, 4, 8, 8)
    positive = [[torch.randn(1, 77, 32), {}]]
    steps = 5
    from harmonizing_attention.nodes.pipeline import schedule as ddim_schedule

    sigmas = ddim_schedule(model, steps)
    assert len(sigmas) == steps + 1

    def patched(alpha):
        sched = paper_schedule(steps=steps, alpha=alpha)
        rules = CrossImageRules(LAYOUT, sched)
        m = apply_plan(model, RowPlan(LAYOUT.rows, rules, needs_step=True, contrast=1.67))
        return m, lambda patched: CrossImageGuider(patched, rules)

    unpatched = _predictions(model, latents, sigmas, positive)
    cross_model, _ = patched(1.0)
    cross = _predictions(cross_model, latents, sigmas, positive)  # ComfyUI's plain guider: eps_cross only
    for alpha in (0.0, 1.0, 3.5):
        m, guider = patched(alpha)
        got = _predictions(m, latents, sigmas, positive, guider=guider)
        for i in range(steps):
            active = 1 <= i  # windows 0.1-0.9 / 0.1-0.7 of 5 steps: 1-4 / 1-3
            assert torch.equal(cross[i], unpatched[i]) != active, i  # the rules really act inside the window
            if alpha == 0 or not active:
                assert torch.equal(got[i], unpatched[i]), (alpha, i)
            elif alpha == 1:
                assert torch.equal(got[i], cross[i]), (alpha, i)
            else:
                assert torch.equal(got[i][:2], cross[i][:2])  # reconstruction rows: one pass's value
                torch.testing.assert_close(got[i][OUT], unpatched[i][OUT] + alpha * (cross[i][OUT] - unpatched[i][OUT]))
    assert model.model_options == options  # the input MODEL is untouched


@torch.no_grad()
def test_generate_alpha_zero_without_adain_is_the_plain_model_and_adain_matches_statistics(tiny):
    from harmonizing_attention.attention import inversion
    from harmonizing_attention.nodes import appearance, pipeline

    model = tiny["tiny"][0]
    torch.manual_seed(5)
    latents = torch.randn(LAYOUT.rows, 4, 8, 8) * 10
    positive = [[torch.randn(1, 77, 32), {}]]
    sigmas = pipeline.schedule(model, 6)
    steps = len(sigmas) - 1  # ddim_uniform gives 7 steps for 6 (1000 // 6 does not divide 1000)
    inverted = appearance.AppearanceInverted(latents=latents, sigmas=sigmas, model_family=pipeline.model_family(model),
                                             image_size=(128, 128))
    plain = pipeline.run_sampler(model, lambda d, x, s, cb: inversion.sample(d, x, s, callback=cb), latents, sigmas,
                          positive, positive, 1.0)
    off = paper_schedule(steps=steps, alpha=0.0, adain=(0.0, 0.0))
    out, app, struct = appearance.generate(model, positive, positive, inverted, 1.0, off, 1.67, False)
    assert torch.equal(torch.cat([app, struct, out]), plain)

    full = paper_schedule(steps=steps)  # paper defaults: AdaIN after every step from 0.2 to the end
    out, app, struct = appearance.generate(model, positive, positive, inverted, 1.0, full, 1.67, False)
    assert not torch.allclose(out, plain[OUT:])
    scale = float(app.std())  # float32 rounding relative to the values' spread
    torch.testing.assert_close(out.mean((2, 3)), app.mean((2, 3)), rtol=0, atol=1e-4 * scale)
    torch.testing.assert_close(out.std((2, 3)), app.std((2, 3)), rtol=1e-4, atol=1e-4 * scale)


# ---------------------------------------------------------------- nodes through the executor

WORKFLOWS = harness.PACK_ROOT / "workflows"


def graph(ckpt="tiny", size=64, **sampler):
    prompt = {
        "1": {"class_type": "HATest_TinyCheckpoint", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "A photo of a wall"}},
        "3": {"class_type": "HATest_Image", "inputs": {"name": "checker", "width": size, "height": size}},
        "4": {"class_type": "HATest_Image", "inputs": {"name": "noise:3", "width": size, "height": size}},
        "5": {"class_type": "HA_AppearanceInversion", "inputs": {
            "model": ["1", 0], "vae": ["1", 2], "conditioning": ["2", 0], "structure": ["3", 0],
            "appearance": ["4", 0], "steps": 4, "denoise": 1.0, "renoise_iterations": 2, "renoise_average": 1}},
        "6": {"class_type": "HA_CrossImageSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0], "inverted": ["5", 0], "cfg": 1.0,
            "contrast": 1.67, "contrast_clip": False, "appearance_guidance": 3.5, "guidance_decay": False,
            "full_res_start": 0.1, "full_res_end": 0.9, "half_res_start": 0.1, "half_res_end": 0.7,
            "adain_start": 0.2, "adain_end": 1.0, "injection_period": 5, "injection_until": 0.4, **sampler}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "HATest_Keep", "inputs": {"value": ["7", 0]}},
    }
    return prompt


def with_masks(prompt, size=64, out_box=(8, 40, 16, 56), app_box=(0, 64, 0, 32), mask_size=None, out_value=1.0):
    mask_size = mask_size or size
    for node, (y0, y1, x0, x1), slot in (("20", out_box, "output_mask"), ("23", app_box, "appearance_mask")):
        base, box, comp = node, str(int(node) + 1), str(int(node) + 2)
        prompt[base] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": mask_size, "height": mask_size}}
        value = out_value if node == "20" else 1.0
        prompt[box] = {"class_type": "SolidMask", "inputs": {"value": value, "width": max(1, x1 - x0),
                                                             "height": max(1, y1 - y0)}}
        prompt[comp] = {"class_type": "MaskComposite", "inputs": {"destination": [base, 0], "source": [box, 0],
                                                                  "x": x0, "y": y0, "operation": "add"}}
        prompt["6"]["inputs"][slot] = [comp, 0]
    return prompt


def test_shipped_appearance_workflow_runs_end_to_end(tiny):
    """The API twin as shipped (paper defaults), the tiny model swapped in, steps lowered to 2 and ReNoise to 2
    iterations (the only changes)."""
    import folder_paths
    from PIL import Image
    from test_pipeline import shipped

    prompt = shipped("api/appearance_transfer.json", ckpt="tiny")
    inversion = [n for n in prompt.values() if n["class_type"] == "HA_AppearanceInversion"]
    assert len(inversion) == 1 and (inversion[0]["inputs"]["steps"], inversion[0]["inputs"]["renoise_iterations"]) == (50, 5)
    inversion[0]["inputs"].update(steps=2, renoise_iterations=2)  # 1 step outside the windows, 1 inside
    out = harness.run_prompt(prompt)
    image = out["7"][0]
    assert image.shape == (1, 512, 512, 3) and torch.isfinite(image).all()
    saved = sorted(Path(folder_paths.get_output_directory()).rglob("appearance_transfer_*.png"))
    assert saved and Image.open(saved[-1]).size == (512, 512)
    sampler = next(n for n in json.loads((WORKFLOWS / "api/appearance_transfer.json").read_text()).values()
                   if n["class_type"] == "HA_CrossImageSampler")["inputs"]
    assert (sampler["contrast"], sampler["appearance_guidance"], sampler["full_res_start"], sampler["full_res_end"],
            sampler["half_res_start"], sampler["half_res_end"], sampler["adain_start"], sampler["adain_end"],
            sampler["injection_period"]) == (1.67, 3.5, 0.1, 0.9, 0.1, 0.7, 0.2, 1.0, 5)


def test_masks_inpainting_model_and_progress(tiny):
    import comfy.utils

    updates = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append((value, total)))
    try:
        out = harness.run_prompt(with_masks(graph(ckpt="tiny-inpaint")))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    latent, app, struct = (out["6"][j]["samples"] for j in range(3))
    assert latent.shape == app.shape == struct.shape == (1, 4, 8, 8) and torch.isfinite(latent).all()
    assert updates.count((4, 4)) >= 2  # inversion and generation, 4 steps each
    # masked AdaIN ran last: inside the output mask the output has the appearance region's statistics
    cm = torch.zeros(8, 8, dtype=torch.bool)
    cm[1:5, 2:7] = True
    sm = torch.zeros(8, 8, dtype=torch.bool)
    sm[:, :4] = True
    torch.testing.assert_close(latent[0][:, cm].mean(1), app[0][:, sm].mean(1), rtol=1e-3, atol=1e-3)
    assert not torch.allclose(latent[0][:, ~cm].mean(1), app[0][:, sm].mean(1), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("change, message", [
    ({"6": {"full_res_start": 0.8, "full_res_end": 0.2}}, "starts at 0.8 after it ends at 0.2"),
    ({"4": {"width": 72}}, "scale the appearance image"),
    ({"5": {"renoise_iterations": 2, "renoise_average": 3}}, "renoise_average"),
    ({"mask_size": 32}, "output_mask is 32x32 but the images are 64x64"),
    ({"out_value": 0.0}, "output_mask is empty (all zero)"),
])
def test_bad_input_is_reported_clearly(tiny, change, message):
    prompt = graph()
    if "mask_size" in change or "out_value" in change:
        prompt = with_masks(prompt, **change)
    else:
        for node_id, inputs in change.items():
            prompt[node_id]["inputs"].update(inputs)
    with pytest.raises(harness.PromptError) as err:
        harness.run_prompt(prompt)
    assert message in str(err.value) + json.dumps(err.value.details, default=str)


def test_model_mismatch_is_refused(tiny):
    prompt = graph()
    prompt["21"] = {"class_type": "HATest_TinyCheckpoint", "inputs": {"ckpt_name": "tiny-inpaint"}}
    prompt["6"]["inputs"]["model"] = ["21", 0]
    with pytest.raises(harness.PromptError, match="connect the same MODEL"):
        harness.run_prompt(prompt)


def test_two_structures_one_appearance(tiny):
    """A batch of structures shares one appearance image: one output per structure."""
    prompt = graph()
    prompt["30"] = {"class_type": "HATest_Image", "inputs": {"name": "gradient", "width": 64, "height": 64}}
    prompt["31"] = {"class_type": "ImageBatch", "inputs": {"image1": ["3", 0], "image2": ["30", 0]}}
    prompt["5"]["inputs"]["structure"] = ["31", 0]
    out = harness.run_prompt(prompt)
    latent, app, struct = (out["6"][j]["samples"] for j in range(3))
    assert latent.shape == app.shape == struct.shape == (2, 4, 8, 8)
    torch.testing.assert_close(app[0], app[1])  # the same appearance image, reconstructed twice
    assert not torch.allclose(struct[0], struct[1])
    assert out["7"][0].shape == (2, 64, 64, 3)


@torch.no_grad()
def test_inversion_rows_schedule_and_inpainting_concat(tiny):
    """Rows [app, struct, out]: a plain model's output rows start from the structure's inversion; an
    inpainting model's rows carry their own concat (own image kept, or the output fully masked) and the
    output rows are inverted under theirs. denoise < 1 keeps the tail of a longer schedule, as KSampler does."""
    from harmonizing_attention.nodes import appearance, pipeline

    structure, app_image = harness.make_image("checker", 64, 64), harness.make_image("noise:4", 64, 64)
    cond = [[torch.zeros(1, 77, 32), {}]]
    model, _, vae = tiny["tiny"]
    inverted = appearance.invert(model, vae, cond, structure, app_image, steps=2, denoise=1.0, iterations=1,
                                 average_last=1)
    assert inverted.latents.shape == (3, 4, 8, 8) and inverted.inpaint_latents is None
    assert torch.equal(inverted.latents[OUT], inverted.latents[STRUCT])
    assert not torch.allclose(inverted.latents[APP], inverted.latents[STRUCT])
    assert torch.equal(inverted.sigmas, pipeline.schedule(model, 2))

    tail = appearance.generation_schedule(model, 10, 0.5)
    assert torch.equal(tail, pipeline.schedule(model, 20)[-11:])

    model, _, vae = tiny["tiny-inpaint"]
    inverted = appearance.invert(model, vae, cond, structure, app_image, steps=2, denoise=1.0, iterations=1,
                                 average_last=1)
    masks = inverted.inpaint_masks
    assert masks.shape == (3, 64, 64) and masks[:2].eq(0).all() and masks[2].eq(1).all()
    # (encoded in another batch: equal up to the VAE's batch-dependent rounding)
    torch.testing.assert_close(inverted.inpaint_latents[:2], vae.encode(torch.cat([app_image, structure])),
                               rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(inverted.inpaint_latents[2:], vae.encode(torch.full_like(structure, 0.5)),
                               rtol=1e-3, atol=1e-4)
    assert not torch.allclose(inverted.latents[OUT], inverted.latents[STRUCT])  # its own concat, its own inversion
