"""The pack's attention patches beside other attention patches on the same MODEL.

ComfyUI's own PerturbedAttentionGuidance (a post-CFG pass with a per-pass attn1 replace on the middle
block) and SelfAttentionGuidance (an attn1 replace on ("middle", 0, 0) that records the map, plus a
post-CFG pass), and a test probe on every attn1 block (a replace patch that scales the attention output
and counts its calls). The pack's sampler nodes patch a clone of the MODEL at sampling time, so ours
always wraps what the MODEL carries: every other patch keeps running, and the MODEL is left as it was.
"""
import collections

import harness
import pytest
import torch
from test_pipeline import graph

pytestmark = pytest.mark.usefixtures("single_thread")


def _model_state(model) -> dict:
    """Everything a patch can leave on a ModelPatcher, by identity (functions compare by identity)."""
    options = model.model_options
    to = options["transformer_options"]
    return {
        "options": {k: (v if not isinstance(v, (dict, list)) else None) for k, v in options.items()},
        "to_keys": sorted(to),
        "replace": {name: dict(patches) for name, patches in to.get("patches_replace", {}).items()},
        "patches": {name: list(fns) for name, fns in to.get("patches", {}).items()},
        "post_cfg": list(options.get("sampler_post_cfg_function", [])),
        "wrappers": repr(to.get("wrappers", {})),
        "callbacks": repr(to.get("callbacks", {})),
        "object_patches": dict(model.object_patches),
        "weight_patches": {k: len(v) for k, v in model.patches.items()},
    }


def probe(model, calls: collections.Counter, factor: float = 0.8):
    """A clone of `model` with a replace patch on every self-attention block: it chains to the patch already
    at that key (as the pack does), scales the attention output by `factor` and counts calls per block."""
    from comfy.ldm.modules.attention import optimized_attention
    from harmonizing_attention.nodes.patch import self_attention_blocks

    patched = model.clone()
    existing = patched.model_options["transformer_options"].get("patches_replace", {}).get("attn1", {})
    for key in self_attention_blocks(model):
        previous = existing.get(key) or existing.get(key[:2])

        def replace(q, k, v, extra_options, key=key, previous=previous):
            calls[key] += 1
            if previous is not None:
                out = previous(q, k, v, extra_options)
            else:
                out = optimized_attention(q, k, v, extra_options["n_heads"])
            return out * factor

        patched.set_model_attn1_replace(replace, *key)
    return patched


def their_nodes(model, pag: float = 3.0, sag: float = 0.8):
    """ComfyUI's SelfAttentionGuidance, then PerturbedAttentionGuidance, as the nodes apply them."""
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance
    from comfy_extras.nodes_sag import SelfAttentionGuidance

    if sag is not None:
        model = SelfAttentionGuidance.execute(model, scale=sag, blur_sigma=2.0).result[0]
    return PerturbedAttentionGuidance.execute(model, scale=pag).result[0]


def ours(tiny, model, name: str, cfg: float = 2.0, modes=("texture_aligning", "geometry_preserving")) -> torch.Tensor:
    """The geometry transfer graph on `model` (registered under `name` for HATest_TinyCheckpoint)."""
    _, clip, vae = tiny["tiny-inpaint"]
    tiny[name] = (model, clip, vae)
    prompt = graph(ckpt=name, steps=2, renoise_iterations=1, attention=modes[0])
    prompt["10"]["inputs"].update(cfg=cfg, attention=modes[1])
    return harness.run_prompt(prompt)["10"][0]["samples"]


@pytest.fixture()
def base(tiny):
    return tiny["tiny-inpaint"][0]


def test_ours_on_top_of_pag_sag_and_a_probe_on_every_block(tiny, base):
    from harmonizing_attention.nodes.patch import self_attention_blocks

    calls = collections.Counter()
    stack = probe(their_nodes(base), calls)
    before, base_before = _model_state(stack), _model_state(base)
    out = ours(tiny, stack, "coexist-stack")

    blocks = self_attention_blocks(base)
    assert set(calls) == set(blocks), "the probe was not called on every self-attention block"
    assert len(set(calls.values())) == 1, f"blocks were called unequally often: {dict(calls)}"
    assert _model_state(stack) == before and _model_state(base) == base_before, "our nodes changed an input MODEL"
    sag_key = ("middle", 0, 0)
    assert sag_key in stack.model_options["transformer_options"]["patches_replace"]["attn1"]
    assert len(stack.model_options["sampler_post_cfg_function"]) == 2  # SAG's and PAG's

    # every effect is present: ours (vs. plain self-attention modes), the probe's, PAG's + SAG's
    plain_modes = ours(tiny, stack, "coexist-stack", modes=("geometry_only", "self_only"))
    without_probe = ours(tiny, their_nodes(base), "coexist-their")
    without_theirs = ours(tiny, probe(base, collections.Counter()), "coexist-probe")
    for other, what in ((plain_modes, "ours"), (without_probe, "the probe's"), (without_theirs, "PAG's and SAG's")):
        assert not torch.allclose(out, other, atol=1e-6), f"{what} effect is missing"
    assert torch.isfinite(out).all()


def test_pag_alone_takes_over_its_own_pass(tiny, base):
    """PAG's perturbed pass puts its replace under ("middle", 0): it replaces ours there for that pass only,
    as it intends; the normal passes keep ours. Same output as PAG's scale 0 only if PAG had no effect."""
    with_pag = ours(tiny, their_nodes(base, pag=3.0, sag=None), "coexist-pag")
    pag_off = ours(tiny, their_nodes(base, pag=0.0, sag=None), "coexist-pag0")
    plain = ours(tiny, base, "coexist-base")
    assert torch.equal(pag_off, plain)  # scale 0: PAG's function returns the CFG result untouched
    assert not torch.allclose(with_pag, plain, atol=1e-6)


def test_their_nodes_after_ours_see_an_untouched_model(tiny, base):
    """The other way round: a KSampler on PAG(SAG(MODEL)) gives the same latents before and after our nodes
    ran on that MODEL (and on PAG(SAG(MODEL))), and in the same prompt as our nodes."""
    from test_pipeline import ksampler_graph

    def their_ksampler(extra: dict | None = None):
        prompt = ksampler_graph()
        prompt["20"] = {"class_type": "SelfAttentionGuidance", "inputs": {"model": ["1", 0], "scale": 0.8,
                                                                         "blur_sigma": 2.0}}
        prompt["21"] = {"class_type": "PerturbedAttentionGuidance", "inputs": {"model": ["20", 0], "scale": 3.0}}
        prompt["6"]["inputs"].update(model=["21", 0], steps=2)
        prompt.update(extra or {})
        return harness.run_prompt(prompt)["6"][0]["samples"]

    reference = their_ksampler()
    ours(tiny, their_nodes(base), "coexist-their")  # on PAG(SAG(MODEL)), so on MODEL too
    assert torch.equal(their_ksampler(), reference)
    # one prompt: the pack's nodes and their nodes on the same MODEL output
    pack = {k: v for k, v in graph(ckpt="tiny-inpaint", steps=2, renoise_iterations=1).items() if k != "1"}
    pack = {f"p{k}": v for k, v in pack.items()}
    for node in pack.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                node["inputs"][name] = ["1" if value[0] == "1" else f"p{value[0]}", value[1]]
    assert torch.equal(their_ksampler(pack), reference)
