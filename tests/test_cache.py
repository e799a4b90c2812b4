"""Re-runs reuse the sources' inversion (nodes/reuse.py): only when nothing it depends on changed, bit for bit
what a fresh computation gives, bounded, and freed with the model."""
import gc

import pytest
import torch

import harness
from test_pipeline import graph


@pytest.fixture(scope="module")
def setup(tiny, single_thread):
    """The tiny inpainting model with a spy counting the rows of every UNet evaluation."""
    model, _, vae = tiny["tiny-inpaint"]
    rows: list[int] = []

    def spy(executor, x, *args, **kwargs):
        rows.append(x.shape[0])
        return executor(x, *args, **kwargs)

    spied = harness.with_diffusion_wrapper(model, "ha-test-cache-spy", spy)
    tiny["tiny-inpaint-spied"] = (spied, tiny["tiny-inpaint"][1], vae)
    return spied, vae, rows


def scene(target="checker", shift=8, size=64):
    from harmonizing_attention.attention import edit
    from harmonizing_attention.nodes.pipeline import Scene

    source, target = harness.make_image("noise:1", size, size), harness.make_image(target, size, size)
    mask = torch.zeros(1, size, size)
    mask[:, 16:40, 20:44] = 1.0
    geometry, geometry_mask = edit.place_source(source, mask, target, edit.Placement(shift_x=shift))
    return Scene(source=source, source_mask=mask, target=target, geometry=geometry, geometry_mask=geometry_mask)


COND = [[torch.randn(1, 77, harness.TINY_CONTEXT_DIM, generator=torch.Generator().manual_seed(0)), {}]]
BASE = dict(steps=2, iterations=2, average_last=1)


def invert(model, vae, rows, s, **settings):
    """(z_T of every row, whether the source rows were inverted here rather than reused)."""
    from harmonizing_attention.nodes import pipeline

    rows.clear()
    args = {**BASE, **settings}
    inverted = pipeline.invert(model, vae, COND, s, args["steps"], args["iterations"], args["average_last"],
                               "texture_aligning")
    return inverted.latents, 1 in rows  # the sources run as a batch of their own (1 row here)


def fresh(model, vae, rows, s, **settings):
    from harmonizing_attention.nodes import reuse

    reuse.CACHE.clear()
    latents, computed = invert(model, vae, rows, s, **settings)
    assert computed
    return latents


def loaded_reuse():
    """nodes/reuse.py as ComfyUI loaded the pack."""
    return harness.loaded("reuse")


def lora_like(model):
    """A clone with a weight patch on one attention projection, as a LoRA loader makes it."""
    clone = model.clone()
    key = next(k for k in clone.model_state_dict() if k.endswith("attn1.to_q.weight"))
    weight = clone.model_state_dict()[key]
    clone.add_patches({key: (torch.full_like(weight, 0.05),)}, strength_patch=1.0)
    return clone


@pytest.mark.parametrize("change", ["model", "target", "steps", "renoise_iterations", "renoise_average"])
def test_a_change_recomputes_what_depends_on_it(setup, change):
    """After a first run, changing one input gives exactly a fresh computation's result with that input; the
    sources' inversion is reused only when it does not depend on the change (the target)."""
    model, vae, rows = setup
    first, _ = invert(model, vae, rows, scene())
    changed_model, s, settings = model, scene(), {}
    if change == "model":
        changed_model = lora_like(model)
    elif change == "target":
        s = scene(target="gradient")
    elif change == "steps":
        settings = {"steps": 3}
    elif change == "renoise_iterations":
        settings = {"iterations": 3}
    else:
        settings = {"iterations": 2, "average_last": 2}
    rerun, computed = invert(changed_model, vae, rows, s, **settings)
    assert computed == (change != "target")
    assert torch.equal(rerun[:1], first[:1]) == (change == "target")  # row 0: the source
    assert not torch.equal(rerun, first)
    assert torch.equal(rerun, fresh(changed_model, vae, rows, s, **settings))


def test_moving_the_geometry_reuses_the_sources_bit_for_bit(setup):
    """Through ComfyUI's executor: a re-run with the geometry moved inverts only [target, geometry], denoises only
    the output (replaying the source's recorded keys/values) and its decoded output equals a run with that
    placement from an empty cache, bit for bit."""
    reuse = loaded_reuse()
    _, _, rows = setup
    reuse.CACHE.clear()
    prompt = graph(ckpt="tiny-inpaint-spied", steps=2, renoise_iterations=2)
    rows.clear()
    harness.run_prompt(prompt)
    first = list(rows)
    prompt["6"]["inputs"]["shift_x"] = 4.0
    rows.clear()
    hits = reuse.CACHE.hits
    moved = harness.run_prompt(prompt)["11"][0]
    # 2 steps x 2 ReNoise evaluations of the source (1 row), of [target, geometry]; 2 steps of source, output
    assert first == [1] * 4 + [2] * 4 + [1] * 2 + [1] * 2
    assert rows == [2] * 4 + [1] * 2 and reuse.CACHE.hits == hits + 2  # the source's inversion and generation
    reuse.CACHE.clear()
    rows.clear()
    assert torch.equal(moved, harness.run_prompt(prompt)["11"][0])
    assert rows == first  # computed again


def test_entries_are_freed_with_the_model_and_when_comfyui_unloads_it(setup):
    import comfy.model_management
    from harmonizing_attention.nodes import reuse

    model, vae, rows = setup
    reuse.CACHE.clear()
    other = lora_like(model)
    invert(other, vae, rows, scene())
    assert len(reuse.CACHE) == 1 and reuse.CACHE.bytes > 0
    del other
    gc.collect()
    assert len(reuse.CACHE) == 0 and reuse.CACHE.bytes == 0

    invert(model, vae, rows, scene())
    assert len(reuse.CACHE) == 1
    reuse.release_unloaded()
    assert len(reuse.CACHE) == 1  # still loaded
    comfy.model_management.unload_all_models()  # the app's "unload models"
    reuse.release_unloaded()  # what the next consultation of the cache does first
    assert len(reuse.CACHE) == 0
    assert invert(model, vae, rows, scene())[1]  # computed again


def test_the_cache_is_bounded_and_evicts_the_oldest():
    from harmonizing_attention.nodes.reuse import Cache

    cache = Cache(budget=3 * 400)
    value = lambda: (torch.zeros(100), None)  # 400 bytes  # noqa: E731
    for name in "abc":
        cache.put((name,), value(), frozenset({1}))
    assert cache.get(("a",)) is not None  # a is now the most recently used
    cache.put(("d",), value(), frozenset({2}))
    assert cache.get(("b",)) is None and all(cache.get((n,)) is not None for n in "acd")
    assert cache.bytes == 3 * 400 and cache.peak_bytes == 3 * 400
    cache.put(("big",), (torch.zeros(301),), frozenset())  # larger than the whole budget: not kept
    assert cache.get(("big",)) is None and len(cache) == 3
    cache.drop_owner(1)
    assert [cache.get((n,)) is not None for n in "acd"] == [False, False, True] and cache.bytes == 400
