"""The main-job command (scripts/run.sh): the install check, one's own photos from any folder, the help, and every
refusal it makes before anything long starts (a missing checkpoint before an environment is built)."""
import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import harness

SCRIPTS = harness.PACK_ROOT / "scripts"
RUN = ["bash", str(SCRIPTS / "run.sh")]


def _env(**extra):
    """run.sh's environment: this ComfyUI, this test's Python (ready: nothing is set up)."""
    return {**os.environ, "COMFYUI_PATH": str(harness.start()["root"]), "PYTHON": sys.executable, **extra}


def _run(args, timeout=600, **env):
    return subprocess.run(RUN + args, capture_output=True, text=True, timeout=timeout, env=_env(**env))


def test_missing_checkpoint_is_reported_before_any_environment_build(tmp_path):
    """A fresh machine: the Python has none of ComfyUI's packages and no environment is cached. run.sh names the
    missing checkpoint and where it looked before it builds anything (it would take minutes)."""
    bare = tmp_path / "bare"  # a Python without ComfyUI's packages
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    venv = tmp_path / "venv"  # where env.sh would build the environment
    run = _run(["--ckpt", "no-such-model.safetensors"], timeout=120, PYTHON=str(bare / "bin" / "python"),
               HA_VENV_DIR=str(venv))
    assert run.returncode == 2, run.stderr
    assert "checkpoint 'no-such-model.safetensors' not found" in run.stderr
    assert "models/checkpoints" in run.stderr and "--ckpt /path/to/file.safetensors" in run.stderr
    assert "bash scripts/run.sh --check" in run.stderr
    assert "setting up" not in run.stderr and not venv.exists()  # nothing was built
    run = _run(["--target", str(tmp_path / "nowhere.png")], timeout=120, PYTHON=str(bare / "bin" / "python"),
               HA_VENV_DIR=str(venv))
    assert run.returncode == 2 and f"--target {tmp_path / 'nowhere.png'}: no such file" in run.stderr
    assert not venv.exists()


def test_help_names_the_images_their_nodes_and_the_widgets():
    run = _run(["--help"], timeout=60, PYTHON="/nonexistent")  # the help needs no ComfyUI environment
    assert run.returncode == 0, run.stderr
    for text in ("--source FILE   node 3 LoadImage: crack_source.png",
                 "--mask FILE   node 3 LoadImage MASK (its alpha, painted in the mask editor): crack_source.png",
                 "--target FILE   node 5 LoadImage: target_brick.png", "default files in --input-dir",
                 "8 HA_TextureAligningInversion: steps=25 renoise_iterations=5", "6 HA_GeometryImageEdit: shift_x=0.0",
                 '1 CheckpointLoaderSimple: ckpt_name="sd-v1-5-inpainting.safetensors"  (or --ckpt)', "--check",
                 "its image is noise", "example_images"):
        assert text in run.stdout, text
    run = _run(["--workflow", str(harness.PACK_ROOT / "workflows/api/appearance_transfer.json"), "--help"],
               timeout=60)
    assert "--structure FILE   node 3 LoadImage: target_hazelnut.png" in run.stdout
    assert "--appearance FILE   node 4 LoadImage: crack_source.png" in run.stdout and "--source" not in run.stdout


def test_refusals_name_the_file_and_the_fix(comfy, tmp_path):
    """Each refused before ComfyUI starts (run_workflow.main returns at once), in words, not a validation dict."""
    import evaluate
    import run_workflow

    evaluate.save_image(harness.make_image("noise:1", 64, 64), tmp_path / "cut.png")
    whole = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    flux2 = harness.PACK_ROOT / "workflows" / "api" / "flux2_geometry_transfer.json"  # UNET / CLIP / VAE loaders
    cases = [
        (["--set", "3.image=nope.png"], "node 3 (LoadImage) reads nope.png, which is not in"),
        (["--set", "3.image=nope.png"], "give the file with --source FILE"),
        (["--check", "--target", str(tmp_path / "cut.png")], f"--target: {tmp_path / 'cut.png'} is truncated"),
        (["--set", "99.steps=1"], "expected NODE.INPUT=VALUE with NODE one of"),
        (["--set", "6.source=1"], "source of node 6 is a connection, not a widget; give its image with --source"),
        (["--check", "--ckpt", "x.safetensors"], "--check runs a tiny random-weight checkpoint of its own"),
        (["--workflow", str(tmp_path / "none.json")], "no such file"),
        (["--ckpt", str(tmp_path / "old.ckpt")], "only .safetensors checkpoints are loaded"),
        (["--workflow", str(flux2), "--ckpt", "x.safetensors"],
         "--ckpt sets the file of a Load Checkpoint node, and this workflow has none"),
        (["--workflow", str(flux2), "--ckpt", "x.safetensors"], "--set 1.unet_name=FILE (UNETLoader)"),
        (["--workflow", str(flux2), "--check"], "--check runs SD1.5 workflows only"),
        (["--workflow", str(flux2)], "node 1 (UNETLoader) unet_name: flux2_dev_fp8mixed.safetensors in"),
    ]
    (tmp_path / "old.ckpt").write_bytes(b"")
    for args, text in cases:
        buf = io.StringIO()
        with contextlib.redirect_stderr(buf):
            code = run_workflow.main(args + ["--output-dir", str(tmp_path / "out")])
        assert code == 2 and text in buf.getvalue(), (args, buf.getvalue())
    assert not (tmp_path / "out").exists()


def test_checkpoint_path_and_overrides(comfy, tmp_path):
    import folder_paths
    from run_workflow import Refused, _override, apply_overrides, resolve_checkpoint

    prompt = json.loads((harness.PACK_ROOT / "workflows" / "api/geometry_transfer.json").read_text())
    ckpt = tmp_path / "mine.safetensors"
    ckpt.write_bytes(b"")
    resolve_checkpoint(prompt, str(ckpt))
    assert prompt["1"]["inputs"]["ckpt_name"] == "mine.safetensors"
    found = folder_paths.get_full_path("checkpoints", "mine.safetensors")
    assert os.path.realpath(found) == str(ckpt.resolve())
    assert os.listdir(os.path.dirname(found)) == ["mine.safetensors"]  # its own folder: nothing else to scan
    apply_overrides(prompt, ["8.steps=10", "6.shift_x=-12.5", "2.text=a brick wall"])
    assert prompt["8"]["inputs"]["steps"] == 10 and prompt["6"]["inputs"]["shift_x"] == -12.5
    assert prompt["2"]["inputs"]["text"] == "a brick wall"
    with pytest.raises(Refused, match="node 8 .HA_TextureAligningInversion. has no input 'stepz'; its widgets: steps"):
        _override(prompt, "8.stepz=3")  # ComfyUI itself would ignore the name
    _override(prompt, "10.balance_weight=2")  # an input of the node's schema


def test_describe_turns_a_validation_report_into_lines(tiny):
    """A refused prompt as the user reads it: one line per node and input, ComfyUI's per-input repeats folded."""
    from run_workflow import describe
    from test_pipeline import shipped

    prompt = shipped("api/geometry_transfer.json")
    prompt["3"]["inputs"]["image"] = "nope.png"
    prompt["10"]["inputs"]["cfg"] = float("nan")
    with pytest.raises(harness.PromptError) as err:
        harness.run_prompt(prompt)
    text = describe(err.value, prompt, "/the/input/folder")
    lines = text.splitlines()
    assert lines[0] == "the workflow was refused before it ran:"
    assert "  node 3 (LoadImage): Invalid image file: nope.png" in lines
    assert "    it reads files under /the/input/folder; give the file with --source FILE" in lines
    nan = [line for line in lines if line.startswith("  node 10 (HA_GeometryPreservingSampler)")]
    assert len(nan) == 1 and "cfg is NaN (not a number): set it to a number from 0 to 30 (default 1)" in nan[0]
    assert "{" not in text


def test_set_images_points_the_loaders_at_files_anywhere(tmp_path):
    """Files from two folders: ComfyUI's input folder becomes their common parent, each loader gets its relative
    path; a mask taken from a LoadImage's MASK output (alpha painted in the mask editor) gets a LoadImageMask of the
    file given."""
    from run_workflow import image_loaders, set_images

    prompt = json.loads((harness.PACK_ROOT / "workflows/api/geometry_transfer.json").read_text())
    assert prompt["6"]["inputs"]["source_mask"] == ["3", 1]  # the source's own alpha, as the mask editor saves it
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    root = set_images(prompt, {"source": str(tmp_path / "a" / "A.jpg"), "source_mask": str(tmp_path / "b" / "M.png")},
                      str(tmp_path / "examples"))
    assert root == str(tmp_path)
    assert prompt["3"]["inputs"]["image"] == "a/A.jpg" and prompt["5"]["inputs"]["image"] == "examples/target_brick.png"
    [(mask_node, slot)] = image_loaders(prompt)["source_mask"]
    assert prompt[mask_node] == {"class_type": "LoadImageMask", "inputs": {"image": "b/M.png", "channel": "red"}}
    assert slot == 0 and prompt["6"]["inputs"]["source_mask"] == [mask_node, 0]


def _photos(folder, size=128):
    """Own photos in a folder outside the pack: a source, its mask (white box), a target."""
    import evaluate
    import torch

    folder.mkdir()
    evaluate.save_image(harness.make_image("noise:2", size, size), folder / "A.png")
    mask = torch.zeros(1, size, size, 3)
    mask[0, 20:36, 16:40] = 1.0
    evaluate.save_image(mask, folder / "M.png")
    evaluate.save_image(harness.make_image("checker", size, size), folder / "B.png")
    return folder / "A.png", folder / "M.png", folder / "B.png"


def test_own_photos_from_any_folder_on_a_checkpoint_file(comfy, tmp_path):
    """--source/--mask/--target from a folder outside the pack and --ckpt a file path: the shipped workflow runs on
    them (CheckpointLoaderSimple loads the tiny SD1.5-inpainting file), each node's steps shown, the image written
    at the target's size and the target's own pixels kept outside the blend."""
    from PIL import Image

    import tiny_checkpoint

    source, mask, target = _photos(tmp_path / "photos")
    out = tmp_path / "out"
    run = _run(["--source", str(source), "--mask", str(mask), "--target", str(target), "--cpu",
                "--ckpt", str(tiny_checkpoint.tiny_checkpoint(9)), "--output-dir", str(out),
                "--set", "8.steps=1", "--set", "8.renoise_iterations=1"])
    assert run.returncode == 0, run.stderr[-3000:]
    [written] = sorted(out.rglob("geometry_transfer_*.png"))
    assert f"wrote {written}" in run.stdout
    for text in ("node 8 HA_TextureAligningInversion", "node 10 HA_GeometryPreservingSampler", "1/1"):
        assert text in run.stderr, text
    image, original = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in (written, target))
    assert image.shape == original.shape
    difference = np.abs(image - original)
    # far from the mask the target's own pixels (SaveImage truncates 255 * x: 1 level), inside it the geometry
    assert difference[96:].max() <= 1 and difference[20:36, 16:40].max() > 8


def test_check_runs_the_whole_shipped_graph_and_says_its_image_is_noise(comfy, tmp_path):
    """The install check: every node of the shipped geometry workflow on the tiny random checkpoint, the example
    images at 256 px, progress shown, an image written, and the plain statement that it is noise. (Steps lowered
    to 2 here, from the check's own 4, for the suite's time.)"""
    from PIL import Image

    run = _run(["--check", "--cpu", "--output-dir", str(tmp_path), "--set", "8.steps=2"])
    assert run.returncode == 0, run.stderr[-3000:]
    [written] = sorted(tmp_path.rglob("install_check_NOISE_*.png"))
    assert f"wrote {written}" in run.stdout and Image.open(written).size == (256, 256)
    assert "install check passed" in run.stdout and "NOISE by design" in run.stdout
    prompt = json.loads((harness.PACK_ROOT / "workflows/api/geometry_transfer.json").read_text())
    for node_id, node in prompt.items():  # every node ran, in order, shown as it started
        assert f"node {node_id} {node['class_type']}\n" in run.stderr, node_id
    assert "HA_TextureAligningInversion: 100%" in run.stderr and "2/2" in run.stderr
