"""The harness drives the real ComfyUI: core nodes run on the tiny models, and the pack is registered."""
import torch

import harness

PACK_NODES = {
    "HA_GeometryImageEdit", "HA_ColorShift", "HA_TextureAligningInversion", "HA_LatentBlend",
    "HA_GeometryPreservingSampler", "HA_AddGeometry",
}


def test_pack_nodes_are_registered(comfy):
    import nodes

    assert PACK_NODES <= set(nodes.NODE_CLASS_MAPPINGS)
    for node_id in PACK_NODES:
        assert nodes.NODE_CLASS_MAPPINGS[node_id].RELATIVE_PYTHON_MODULE.startswith("custom_nodes.")


def test_core_inpainting_graph_runs(tiny):
    prompt = {
        "1": {"class_type": "HATest_TinyCheckpoint", "inputs": {"ckpt_name": "tiny-inpaint"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "3": {"class_type": "HATest_Image", "inputs": {"name": "checker", "width": 64, "height": 64}},
        "4": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}},
        "5": {"class_type": "InpaintModelConditioning", "inputs": {
            "positive": ["2", 0], "negative": ["2", 0], "vae": ["1", 2], "pixels": ["3", 0], "mask": ["4", 0],
            "noise_mask": True}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["5", 0], "negative": ["5", 1], "latent_image": ["5", 2], "seed": 1,
            "steps": 2, "cfg": 1.0, "sampler_name": "ddim", "scheduler": "ddim_uniform", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "HATest_Keep", "inputs": {"value": ["7", 0]}},
    }
    out = harness.run_prompt(prompt)
    image = out["7"][0]
    assert image.shape == (1, 64, 64, 3)
    assert torch.isfinite(image).all()
