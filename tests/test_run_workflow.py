"""The main-job command: checkpoint resolution, overrides, and its message for a missing checkpoint."""
import json
import os
import subprocess
import sys

import pytest

import harness

SCRIPTS = harness.PACK_ROOT / "scripts"


def test_missing_checkpoint_names_the_file_and_where(tmp_path):
    env = {**os.environ, "COMFYUI_PATH": str(harness.start()["root"])}
    run = subprocess.run(
        [sys.executable, str(SCRIPTS / "run_workflow.py"), "--cpu", "--ckpt", "no-such-model.safetensors",
         "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert run.returncode != 0
    assert "checkpoint 'no-such-model.safetensors' not found" in run.stderr
    assert "models/checkpoints" in run.stderr and "--ckpt /path/to/file.safetensors" in run.stderr
    assert not any(tmp_path.iterdir())  # failed before running anything


def test_checkpoint_path_and_overrides(comfy, tmp_path):
    import folder_paths
    from run_workflow import apply_overrides, resolve_checkpoint

    prompt = json.loads((harness.PACK_ROOT / "workflows" / "api/geometry_transfer.json").read_text())
    ckpt = tmp_path / "mine.safetensors"
    ckpt.write_bytes(b"")
    resolve_checkpoint(prompt, str(ckpt))
    assert prompt["1"]["inputs"]["ckpt_name"] == "mine.safetensors"
    assert folder_paths.get_full_path("checkpoints", "mine.safetensors") == str(ckpt)
    apply_overrides(prompt, ["8.steps=10", "6.shift_x=-12.5", "2.text=a brick wall"])
    assert prompt["8"]["inputs"]["steps"] == 10 and prompt["6"]["inputs"]["shift_x"] == -12.5
    assert prompt["2"]["inputs"]["text"] == "a brick wall"
    with pytest.raises(SystemExit, match="NODE.INPUT=VALUE"):
        apply_overrides(prompt, ["99.steps=1"])
    pickle = tmp_path / "old.ckpt"
    pickle.write_bytes(b"")
    with pytest.raises(SystemExit, match="only .safetensors"):
        resolve_checkpoint(prompt, str(pickle))


def test_a_mask_file_of_its_own_takes_the_place_of_the_source_alpha():
    """--mask (and the dataset runner): the shipped geometry workflows read the source mask from the source Load
    Image's MASK output (its alpha, as the app's mask editor saves it); mask_loader puts a LoadImageMask (red channel)
    in that output's place for every input that read it, and finds it again rather than adding a second."""
    from run_workflow import mask_loader

    for name in ("geometry_transfer", "multi_geometry_transfer", "geometry_transfer_sdxl"):
        prompt = json.loads((harness.PACK_ROOT / "workflows" / "api" / f"{name}.json").read_text())
        readers = [(k, i) for k, n in prompt.items() for i, v in n["inputs"].items() if v == ["3", 1]]
        assert readers and prompt["3"]["class_type"] == "LoadImage", name
        new = mask_loader(prompt)
        assert prompt[new] == {"class_type": "LoadImageMask", "inputs": {"image": "crack_source.png", "channel": "red"}}
        assert all(prompt[k]["inputs"][i] == [new, 0] for k, i in readers), name
        assert ["3", 1] not in [v for n in prompt.values() for v in n["inputs"].values()]
        size = len(prompt)
        assert mask_loader(prompt) == new and len(prompt) == size
    appearance = json.loads((harness.PACK_ROOT / "workflows" / "api" / "appearance_transfer.json").read_text())
    with pytest.raises(ValueError, match="source_mask"):
        mask_loader(appearance)


def test_main_job_runs_the_shipped_workflow_on_a_real_checkpoint_file(comfy, tmp_path):
    """The README's main job, as a user runs it: the shipped workflow and example images, a checkpoint
    file loaded by CheckpointLoaderSimple (a random SD1.5-inpainting one, SD1.5-detectable), an image out.
    Only the step counts are lowered, through the command's own --set."""
    from PIL import Image

    import comfy_server

    ckpt = comfy_server.tiny_checkpoint(9)
    env = {**os.environ, "COMFYUI_PATH": str(harness.start()["root"])}
    run = subprocess.run(
        [sys.executable, str(SCRIPTS / "run_workflow.py"), "--cpu", "--ckpt", str(ckpt), "--output-dir", str(tmp_path),
         "--set", "8.steps=1", "--set", "8.renoise_iterations=1"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    written = sorted(tmp_path.rglob("geometry_transfer_*.png"))
    assert len(written) == 1 and f"wrote {written[0]}" in run.stdout
    assert Image.open(written[0]).size == Image.open(harness.PACK_ROOT / "example_images" / "target_brick.png").size
