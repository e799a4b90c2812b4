"""ComfyUI's step caches (EasyCache, LazyCache) and DifferentialDiffusion in front of the pack's nodes.

A step cache skips model evaluations whose input changed little and counts evaluations as steps: ReNoise's several
evaluations per inversion step, a UNet source pass replayed evaluation by evaluation and the appearance guidance's two
evaluations per step would break (or silently degrade) under it. The pack suspends the caches for its passes on a clone
and says so on the node: every result equals the cache-free one bit for bit, the MODEL keeps its cache for the user's
other nodes, and with the suspension switched off the same graphs fail or differ (the control). DifferentialDiffusion
acts only in a sampler given a denoise mask, which the pack's are not: the nodes say it has no effect.
"""
import logging

import harness
import pytest
import torch
from test_coexistence import _model_state

pytestmark = pytest.mark.usefixtures("single_thread")

DEFAULT = {"reuse_threshold": 0.2, "start_percent": 0.15, "end_percent": 0.95}  # both ComfyUI versions' defaults
AGGRESSIVE = {"reuse_threshold": 3.0, "start_percent": 0.0, "end_percent": 1.0}
CACHES = {
    "easycache-default": ("EasyCache", DEFAULT),
    "easycache-aggressive": ("EasyCache", AGGRESSIVE),
    "lazycache-default": ("LazyCache", DEFAULT),
    "lazycache-aggressive": ("LazyCache", AGGRESSIVE),
}
MODEL_NODES = {"8": "HA_TextureAligningInversion", "10": "HA_GeometryPreservingSampler"}


def with_node(prompt: dict, model_inputs, class_type: str, **inputs) -> dict:
    """`prompt` with node "30" (class_type, model from the loader "1") feeding the given nodes' model inputs."""
    prompt["30"] = {"class_type": class_type, "inputs": {"model": ["1", 0], **inputs}}
    for node in model_inputs:
        prompt[node]["inputs"]["model"] = ["30", 0]
    return prompt


def with_cache(prompt: dict, model_inputs, cache: str) -> dict:
    kind, settings = CACHES[cache]
    return with_node(prompt, model_inputs, kind, **settings, verbose=False)


def run(prompt: dict):
    """(outputs, {node: the text of its UI output}, {node: the sections of it marked as warnings (web/notes.js shows
    them amber)}) of one run through the executor."""
    executor = harness.comfy_runtime.new_executor()
    out = harness.run_prompt(prompt, executor)
    outputs = executor.history_result["outputs"]
    texts = {node: "\n".join(ui["text"]) for node, ui in outputs.items() if "text" in ui}
    warnings = {node: [s["text"] for s in ui.get("ha_notes", []) if s["level"] == "warning"] for node, ui in outputs.items()}
    return out, texts, warnings


def geometry_graph(ckpt="tiny-inpaint", **kw):
    from test_pipeline import graph

    return graph(ckpt=ckpt, steps=10, renoise_iterations=2, **kw)


@pytest.fixture(scope="module")
def reference(tiny):
    """The cache-free geometry transfer: (inverted latents, output, source reconstruction)."""
    out, texts, warnings = run(geometry_graph())
    # without a cache the nodes say what ran (the inversion its schedule, a note), never that something was suspended
    assert not [w for node in MODEL_NODES for w in warnings[node] if "suspended" in w or "no effect" in w], warnings
    assert "Schedule: ddim_uniform (default)" in texts["8"]  # the control: the nodes' text is read
    return tensors(out, MODEL_NODES)


def tensors(out, nodes) -> list[torch.Tensor]:
    """The latents the nodes output (an inversion's latents, a sampler's LATENTs), in order."""
    return [v["samples"] if isinstance(v, dict) else v.latents for node in nodes for v in out[node]]


def same_run(out, reference) -> bool:
    return all(torch.equal(a, b) for a, b in zip(tensors(out, MODEL_NODES), reference, strict=True))


@pytest.mark.parametrize("cache", list(CACHES))
def test_step_caches_are_suspended_in_the_geometry_transfer(tiny, reference, cache, monkeypatch, caplog):
    base = tiny["tiny-inpaint"][0]
    base_state = _model_state(base)
    prompt = with_cache(geometry_graph(), MODEL_NODES, cache)
    # the cached MODEL also feeds a plain KSampler: the user's other nodes keep the cache
    prompt["31"] = {"class_type": "KSampler", "inputs": {
        "model": ["30", 0], "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["32", 0], "seed": 1,
        "steps": 8, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    prompt["32"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["5", 0], "vae": ["1", 2]}}
    prompt["33"] = {"class_type": "HATest_Keep", "inputs": {"value": ["31", 0]}}
    caplog.set_level(logging.INFO)
    out, texts, _ = run(prompt)
    assert same_run(out, reference), f"{cache}: the pack's result changed"
    name = CACHES[cache][0]
    for node, node_name in MODEL_NODES.items():
        assert f"{name} on the MODEL is suspended in {node_name}" in texts[node], texts.get(node)
        assert f"keeps {name} for your other nodes" in texts[node]
    logged = [r.getMessage() for r in caplog.records if "Harmonizing Attention" in r.getMessage()]
    assert sum(f"{name} on the MODEL is suspended" in m for m in logged) == 2, logged
    # the cache ran for the KSampler only (ComfyUI logs each sampling it wraps), and skipped there when aggressive
    runs = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{name} - skipped")]
    assert len(runs) == 1, runs
    if "aggressive" in cache:
        assert not runs[0].startswith(f"{name} - skipped 0/"), runs
    assert name.lower() in {key for by_key in out["30"][0].wrappers.values() for key in by_key}
    assert _model_state(base) == base_state

    assert not suspension_off_keeps(prompt, MODEL_NODES, reference, monkeypatch), f"{cache} had no effect"


def suspension_off_keeps(prompt, nodes, reference, monkeypatch) -> bool:
    """The control: whether the nodes' results stay `reference` with the suspension switched off (False when the
    graph fails at one of the pack's nodes)."""
    with monkeypatch.context() as m:
        m.setattr(harness.loaded("pipeline"), "without_step_caches", lambda model: model)
        try:
            out, _, _ = run(prompt)
        except harness.PromptError as err:
            assert "HA_" in str(err)
            return False
    return all(torch.equal(a, b) for a, b in zip(tensors(out, nodes), reference, strict=True))


def test_a_dit_and_the_appearance_transfer_suspend_them_too(tiny, monkeypatch):
    """Tiny Flux through the geometry nodes (the DiT's joint generation) and the appearance nodes on the UNet, with
    an aggressive EasyCache: bit for bit the cache-free results, each node says so."""
    from test_cross_image import graph as appearance_graph

    _, clip, _ = tiny["tiny"]
    tiny.setdefault("tiny-flux-cache", (harness.tiny_flux(seed=11, depth=1, single=1), clip,
                                        harness.tiny_vae(seed=7, z_channels=16)))
    flux = geometry_graph(ckpt="tiny-flux-cache", size=32, mask_box=(8, 20, 8, 20))
    appearance = appearance_graph(size=32)
    appearance["5"]["inputs"].update(steps=4, renoise_iterations=2)
    for prompt, nodes in ((flux, MODEL_NODES), (appearance, {"5": "HA_AppearanceInversion", "6": "HA_CrossImageSampler"})):
        plain, _, _ = run(prompt)
        cached = with_cache(prompt, nodes, "easycache-aggressive")
        out, texts, _ = run(cached)
        assert all(torch.equal(a, b) for a, b in zip(tensors(out, nodes), tensors(plain, nodes), strict=True))
        for node, node_name in nodes.items():
            assert f"EasyCache on the MODEL is suspended in {node_name}" in texts[node], texts.get(node)
        assert not suspension_off_keeps(cached, nodes, tensors(plain, nodes), monkeypatch)


def test_without_step_caches_removes_them_from_a_clone_only(tiny):
    """Wrappers under the caches' keys go, wherever they are registered (the ModelPatcher's own or the model options'),
    with their state; every other wrapper stays; the input MODEL is untouched; a MODEL without a cache is returned
    as is."""
    from comfy.patcher_extension import WrappersMP, add_wrapper_with_key
    from comfy_extras.nodes_easycache import LazyCacheNode
    from harmonizing_attention.nodes.patch import step_caches, without_step_caches

    base = tiny["tiny"][0]
    assert without_step_caches(base) is base and step_caches(base) == []

    def other(executor, *args, **kwargs):
        return executor(*args, **kwargs)

    model = LazyCacheNode.execute(base, 0.2, 0.15, 0.95, False).result[0]
    model.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "someone-else", other)
    add_wrapper_with_key(WrappersMP.PREDICT_NOISE, "teacache", other, model.model_options, is_model_options=True)
    state = _model_state(model)
    assert step_caches(model) == ["LazyCache", "TeaCache"]
    clone = without_step_caches(model)
    assert step_caches(clone) == [] and "easycache" not in clone.model_options["transformer_options"]
    assert clone.get_wrappers(WrappersMP.DIFFUSION_MODEL, "someone-else") == [other]
    assert _model_state(model) == state and "easycache" in model.model_options["transformer_options"]


def test_differential_diffusion_is_reported_as_without_effect(tiny, reference):
    """DifferentialDiffusion on the MODEL: the same result bit for bit, and both nodes say why it has no effect;
    the control: in a KSampler given a soft noise mask the same MODEL does change the result."""
    from test_pipeline import ksampler_graph

    out, texts, _ = run(with_node(geometry_graph(), MODEL_NODES, "DifferentialDiffusion"))
    assert same_run(out, reference)
    for node, node_name in MODEL_NODES.items():
        assert f"DifferentialDiffusion (a denoise-mask function on the MODEL) has no effect in {node_name}" \
            in texts[node], texts.get(node)

    def ksampler(differential: bool):
        prompt = ksampler_graph()
        prompt["8"] = {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": 64, "height": 64}}
        prompt["9"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["5", 2], "mask": ["8", 0]}}
        prompt["6"]["inputs"]["latent_image"] = ["9", 0]
        if differential:
            with_node(prompt, ["6"], "DifferentialDiffusion")
        return harness.run_prompt(prompt)["6"][0]["samples"]

    assert not torch.equal(ksampler(True), ksampler(False))
