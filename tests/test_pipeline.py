"""The geometry-transfer nodes through ComfyUI's executor, on tiny random models."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import harness

WORKFLOWS = harness.PACK_ROOT / "workflows"
EXAMPLES = harness.PACK_ROOT / "example_images"


def shipped(name: str, ckpt: str = "tiny-inpaint") -> dict:
    """A shipped API workflow with its checkpoint loader swapped for the tiny model, inputs in place."""
    import folder_paths

    for image in EXAMPLES.glob("*.png"):
        shutil.copy(image, Path(folder_paths.get_input_directory()) / image.name)
    prompt = json.loads((WORKFLOWS / name).read_text())
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["class_type"], node["inputs"] = "HATest_TinyCheckpoint", {"ckpt_name": ckpt}
    return prompt


def small(prompt: dict, steps: int = 3, iterations: int = 2) -> dict:
    for node in prompt.values():
        if node["class_type"] == "HA_TextureAligningInversion":
            node["inputs"].update(steps=steps, renoise_iterations=iterations)
    return prompt


def graph(source="noise:1", target="checker", size=64, mask_box=(16, 40, 20, 44), ckpt="tiny-inpaint",
          targets=1, **inversion):
    """Source/target test images, a box mask, the five nodes, decode: a compact geometry transfer."""
    y0, y1, x0, x1 = mask_box
    prompt = {
        "1": {"class_type": "HATest_TinyCheckpoint", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "3": {"class_type": "HATest_Image", "inputs": {"name": source, "width": size, "height": size}},
        "4": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": size, "height": size}},
        "14": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": x1 - x0, "height": y1 - y0}},
        "15": {"class_type": "MaskComposite", "inputs": {"destination": ["4", 0], "source": ["14", 0], "x": x0,
                                                         "y": y0, "operation": "add"}},
        "5": {"class_type": "HATest_Image", "inputs": {"name": target, "width": size, "height": size}},
        "6": {"class_type": "HA_GeometryImageEdit", "inputs": {
            "source": ["3", 0], "source_mask": ["15", 0], "target": ["5", 0],
            "shift_x": 8.0, "shift_y": 0.0, "scale": 1.0, "rotation": 0.0}},
        "7": {"class_type": "HA_ColorShift", "inputs": {"scene": ["6", 2], "mode": "mean_shift", "strength": 0.5,
                                                        "ring_width": 4}},
        "8": {"class_type": "HA_TextureAligningInversion", "inputs": {
            "model": ["1", 0], "vae": ["1", 2], "conditioning": ["2", 0], "scene": ["7", 1],
            "steps": 3, "renoise_iterations": 2, "renoise_average": 1, "attention": "texture_aligning",
            **inversion}},
        "9": {"class_type": "HA_LatentBlend", "inputs": {"inverted": ["8", 0], "feather": 0.0}},
        "10": {"class_type": "HA_GeometryPreservingSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0], "inverted": ["9", 0],
            "cfg": 1.0, "attention": "geometry_preserving"}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "HATest_Keep", "inputs": {"value": ["11", 0]}},
    }
    if targets > 1:
        prompt["16"] = {"class_type": "HATest_Image", "inputs": {"name": "gradient", "width": size, "height": size}}
        prompt["17"] = {"class_type": "ImageBatch", "inputs": {"image1": ["5", 0], "image2": ["16", 0]}}
        prompt["6"]["inputs"]["target"] = ["17", 0]
    return prompt


def test_shipped_workflow_runs_end_to_end(tiny):
    """The API twin as shipped, tiny model swapped in: it carries the paper's defaults (25 steps, 5 ReNoise
    iterations, empty prompt), run here with 4 steps and 2 iterations for the suite's time (the install
    check in test_run_workflow.py runs it through scripts/run.sh too)."""
    import folder_paths
    from PIL import Image

    prompt = shipped("api/geometry_transfer.json")
    inversion = prompt["8"]["inputs"]
    assert (inversion["steps"], inversion["renoise_iterations"], prompt["2"]["inputs"]["text"]) == (25, 5, "")
    inversion.update(steps=4, renoise_iterations=2)
    prompt["12"]["inputs"]["filename_prefix"] = "shipped_end_to_end/geometry_transfer"  # this test's file only
    out = harness.run_prompt(prompt)
    image = out["14"][0]
    assert image.shape == (1, 512, 512, 3) and torch.isfinite(image).all()
    assert out["11"][0].shape[1:3] == out["7"][1].window.canvas_hw  # the model's working region
    saved = list((Path(folder_paths.get_output_directory()) / "shipped_end_to_end").glob("geometry_transfer_*.png"))
    assert len(saved) == 1 and Image.open(saved[0]).size == Image.open(EXAMPLES / "target_brick.png").size


def test_ui_workflows_match_their_api_twins(comfy):
    import nodes
    from workflow_format import api_to_ui, linked_outputs_only, ui_path, ui_to_api

    api_files = sorted(WORKFLOWS.glob("api/*.json"))
    assert api_files
    for api_file in api_files:
        api = json.loads(api_file.read_text())
        ui = json.loads(ui_path(api_file).read_text())
        assert ui_to_api(ui, nodes.NODE_CLASS_MAPPINGS) == api, f"{api_file.name}: run scripts/workflow_format.py"
        assert linked_outputs_only(api_to_ui(api, nodes.NODE_CLASS_MAPPINGS, api_file.stem)) == linked_outputs_only(ui), \
            f"{api_file.name}: run scripts/workflow_format.py"


def test_template_thumbnails_are_current(comfy):
    """Each template's thumbnail (workflows/<title>.jpg, what the app's template browser shows) is the one
    scripts/workflow_format.py draws now from its API twin and the example images."""
    import folder_paths
    import nodes
    import numpy as np
    from PIL import Image
    from workflow_format import Graph, template, thumbnail, ui_path

    examples = str(harness.PACK_ROOT / "example_images")
    before = folder_paths.get_input_directory()
    folder_paths.set_input_directory(examples)  # the workflows' LoadImage names
    try:
        for api_file in sorted(WORKFLOWS.glob("api/*.json")):
            drawn = thumbnail(Graph(json.loads(api_file.read_text()), nodes.NODE_CLASS_MAPPINGS), template(api_file.stem))
            with Image.open(ui_path(api_file).with_suffix(".jpg")) as shipped:
                assert shipped.size == drawn.size
                diff = np.abs(np.asarray(shipped.convert("RGB"), np.float32) - np.asarray(drawn, np.float32)).mean()
            assert diff < 3, f"{api_file.name}: the thumbnail is out of date ({diff:.1f}): run scripts/workflow_format.py"
    finally:
        folder_paths.set_input_directory(before)


def test_outputs_keep_the_target_outside_the_region_and_differ_inside(tiny):
    """Background comes back through inversion + generation; with GP on, the region is changed."""
    out = harness.run_prompt(graph())
    latent = out["10"][0]["samples"]
    assert latent.shape == (1, 4, 8, 8)
    self_only = graph()
    self_only["10"]["inputs"]["attention"] = "self_only"
    plain = harness.run_prompt(self_only)["10"][0]["samples"]
    assert not torch.allclose(latent, plain)
    source_recon = out["10"][1]["samples"]
    assert source_recon.shape == (1, 4, 8, 8)


def test_ablation_modes_all_run(tiny):
    for ta in ("texture_aligning", "geometry_only", "target_only"):
        prompt = graph(attention=ta)
        prompt["7"]["inputs"]["mode"] = "histogram"
        assert torch.isfinite(harness.run_prompt(prompt)["10"][0]["samples"]).all()
    for gp in ("self_only", "source_only"):
        prompt = graph()
        prompt["10"]["inputs"]["attention"] = gp
        prompt["7"]["inputs"]["mode"] = "none"
        assert torch.isfinite(harness.run_prompt(prompt)["10"][0]["samples"]).all()


def test_one_source_many_targets(tiny):
    out = harness.run_prompt(graph(targets=2))
    assert out["10"][0]["samples"].shape == (2, 4, 8, 8)
    assert out["11"][0].shape == (2, 64, 64, 3)


def test_plain_sd15_model_works(tiny):
    out = harness.run_prompt(graph(ckpt="tiny"))
    assert out["10"][0]["samples"].shape == (1, 4, 8, 8)


def ksampler_graph(ckpt="tiny-inpaint"):
    return {
        "1": {"class_type": "HATest_TinyCheckpoint", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a wall"}},
        "3": {"class_type": "HATest_Image", "inputs": {"name": "checker", "width": 64, "height": 64}},
        "4": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}},
        "5": {"class_type": "InpaintModelConditioning", "inputs": {
            "positive": ["2", 0], "negative": ["2", 0], "vae": ["1", 2], "pixels": ["3", 0], "mask": ["4", 0],
            "noise_mask": False}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["5", 0], "negative": ["5", 1], "latent_image": ["5", 2], "seed": 3,
            "steps": 3, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "HATest_Keep", "inputs": {"value": ["6", 0]}},
    }


def test_input_model_unchanged_after_our_nodes(tiny):
    """After the pack's nodes ran, a plain KSampler on the same MODEL gives bit-identical output."""
    import copy

    model = tiny["tiny-inpaint"][0]
    options = copy.deepcopy(model.model_options)
    before = harness.run_prompt(ksampler_graph())["6"][0]["samples"]
    harness.run_prompt(graph())
    after = harness.run_prompt(ksampler_graph())["6"][0]["samples"]
    assert torch.equal(before, after)
    assert model.model_options == options


def test_progress_and_interrupt(tiny):
    """Inversion reports progress per step and stops at the next model call once interrupted."""
    import comfy.model_management
    import comfy.utils

    updates = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append((value, total)))
    try:
        harness.run_prompt(graph(steps=3, renoise_iterations=2))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert (3, 3) in updates  # inversion: 3 steps
    assert updates.count((3, 3)) >= 2  # and generation over the same schedule

    from harmonizing_attention.nodes import pipeline

    model, _, vae = tiny["tiny-inpaint"]
    calls = []
    scene = pipeline.Scene(
        source=torch.rand(1, 64, 64, 3), source_mask=torch.ones(1, 64, 64), target=torch.rand(1, 64, 64, 3),
        geometry=torch.rand(1, 64, 64, 3), geometry_mask=torch.ones(1, 64, 64),
    )
    cond = [[torch.zeros(1, 77, 32), {}]]
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            pipeline.invert(model, vae, cond, scene, steps=25, iterations=5, average_last=1,
                            mode="texture_aligning")
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert not calls


@pytest.mark.parametrize("change, message", [
    ({"14": {"value": 0.0}}, "source mask is empty"),
    ({"6": {"shift_x": 4000.0}}, "off"),
    ({"3": {"width": 72}}, "source_mask is 64x64"),
    ({"8": {"steps": 0}}, "steps"),
    ({"8": {"renoise_iterations": 2, "renoise_average": 3}}, "renoise_average"),
])
def test_bad_input_is_reported_clearly(tiny, change, message):
    prompt = graph()
    for node_id, inputs in change.items():
        prompt[node_id]["inputs"].update(inputs)
    with pytest.raises(harness.PromptError) as err:
        harness.run_prompt(prompt)
    assert message in str(err.value) + json.dumps(err.value.details, default=str)


def test_sizes_not_multiple_of_8_and_prebuilt_inpaint_conditioning(tiny):
    out = harness.run_prompt(graph(size=60, mask_box=(10, 30, 10, 30)))  # padded to the model's step inside
    assert out["10"][0]["samples"].shape == (1, 4, 8, 8)
    prompt = graph()
    prompt["20"] = {"class_type": "InpaintModelConditioning", "inputs": {
        "positive": ["2", 0], "negative": ["2", 0], "vae": ["1", 2], "pixels": ["5", 0], "mask": ["15", 0],
        "noise_mask": True}}
    prompt["8"]["inputs"]["conditioning"] = ["20", 0]
    with pytest.raises(harness.PromptError, match="connect the CLIPTextEncode output directly"):
        harness.run_prompt(prompt)


def test_unblended_inversion_is_refused(tiny):
    prompt = graph()
    prompt["10"]["inputs"]["inverted"] = ["8", 0]
    with pytest.raises(harness.PromptError, match="connect HA_LatentBlend"):
        harness.run_prompt(prompt)


def test_model_mismatch_is_refused(tiny):
    prompt = graph()
    prompt["21"] = {"class_type": "HATest_TinyCheckpoint", "inputs": {"ckpt_name": "tiny"}}
    prompt["10"]["inputs"]["model"] = ["21", 0]
    with pytest.raises(harness.PromptError, match="connect the same MODEL"):
        harness.run_prompt(prompt)
