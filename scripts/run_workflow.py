"""Run a shipped workflow headlessly (no server, no browser) and write its output images.

    python scripts/run_workflow.py --ckpt sd-v1-5-inpainting.safetensors
    python scripts/run_workflow.py --workflow workflows/api/appearance_transfer.json --ckpt /path/model.safetensors
    python scripts/run_workflow.py --set 8.steps=10 --set 6.shift_x=40
    python scripts/run_workflow.py --input-dir photos/ --set 3.image=crack.png --mask crack_mask.png --set 5.image=wall.png

The images the workflow loads are read from the pack's example_images/ folder (or --input-dir); results go
to ComfyUI's output folder (or --output-dir). Set-up on a fresh machine: `bash scripts/run.sh ...`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import comfy_runtime  # noqa: E402

PACK = comfy_runtime.PACK_ROOT


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workflow", default=str(PACK / "workflows" / "api" / "geometry_transfer.json"),
                   help="an API-format workflow (default: the geometry transfer)")
    p.add_argument("--ckpt", help="checkpoint: a file name in ComfyUI's models/checkpoints, or a path to a "
                                  ".safetensors file (default: the workflow's own)")
    p.add_argument("--input-dir", default=str(PACK / "example_images"), help="folder of the images the workflow loads")
    p.add_argument("--output-dir", help="where images are saved (default: ComfyUI's output folder)")
    p.add_argument("--mask", metavar="FILE", help="the source mask as an image of its own in --input-dir (white = the "
                                                  "geometry), instead of the source image's alpha (the mask painted in "
                                                  "the app's mask editor, which the shipped workflows read)")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="override a widget value, e.g. 8.steps=10 (JSON values; repeatable)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    return p.parse_args(argv)


def resolve_checkpoint(prompt: dict, ckpt: str | None) -> None:
    """Point every checkpoint loader at `ckpt`; fail now, clearly, when the file is not there."""
    import folder_paths

    loaders = [n for n in prompt.values() if n["class_type"] == "CheckpointLoaderSimple"]
    for node in loaders:
        name = ckpt or node["inputs"]["ckpt_name"]
        path = Path(name).expanduser()
        if path.suffix and path.is_file():
            if path.suffix != ".safetensors":
                sys.exit(f"{path}: only .safetensors checkpoints are loaded (no pickle files); convert it first")
            folder_paths.add_model_folder_path("checkpoints", str(path.resolve().parent))
            name = path.name
        if folder_paths.get_full_path("checkpoints", name) is None:
            searched = "\n  ".join(folder_paths.get_folder_paths("checkpoints"))
            sys.exit(
                f"checkpoint '{name}' not found. Searched:\n  {searched}\n"
                f"Put the file in {folder_paths.get_folder_paths('checkpoints')[0]} or pass --ckpt /path/to/file.safetensors "
                "(the geometry workflow expects the SD1.5 inpainting checkpoint, e.g. sd-v1-5-inpainting.safetensors)."
            )
        node["inputs"]["ckpt_name"] = name


def mask_loader(prompt: dict) -> str:
    """The id of the LoadImageMask node the geometry's source mask comes from. The shipped geometry workflows read it
    from the source LoadImage's MASK output (the image's alpha, where the app's mask editor saves the painted mask):
    there a LoadImageMask (red channel: white = the geometry) is added, and every input that read that output reads
    the new node instead, so a mask in a file of its own can be given (set its "image")."""
    todo = [n["inputs"]["source_mask"] for n in prompt.values() if isinstance(n["inputs"].get("source_mask"), list)]
    seen = set()
    while todo:
        node_id, slot = todo.pop(0)
        node = prompt[node_id]
        if node["class_type"] == "LoadImageMask":
            return node_id
        if node["class_type"] == "LoadImage" and slot == 1:
            new = str(max(int(k) for k in prompt) + 1)
            prompt[new] = {"class_type": "LoadImageMask", "inputs": {"image": node["inputs"]["image"], "channel": "red"}}
            for other in prompt.values():
                for name, value in other["inputs"].items():
                    if value == [node_id, 1]:
                        other["inputs"][name] = [new, 0]
            return new
        if node_id not in seen:
            seen.add(node_id)
            todo += [v for v in node["inputs"].values() if isinstance(v, list)]
    raise ValueError("no LoadImage MASK output or LoadImageMask node feeds a source_mask input of the workflow")


def apply_overrides(prompt: dict, overrides: list[str]) -> None:
    for item in overrides:
        key, _, value = item.partition("=")
        node_id, _, name = key.partition(".")
        if node_id not in prompt or not name or not _:
            sys.exit(f"--set {item!r}: expected NODE.INPUT=VALUE with NODE one of {sorted(prompt, key=int)}")
        prompt[node_id]["inputs"][name] = _value(value)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prompt = json.loads(Path(args.workflow).read_text())
    import torch

    logging.getLogger().setLevel(logging.ERROR)  # ComfyUI's start-up chatter (e.g. optional audio nodes)
    comfy_runtime.start(cpu=args.cpu or not torch.cuda.is_available())
    logging.getLogger().setLevel(logging.INFO)
    import folder_paths
    import utils.extra_config

    root = comfy_runtime.find_comfyui()
    for config in (root / "extra_model_paths.yaml",):
        if config.is_file():  # the user's own model folders, as ComfyUI's main.py reads them
            utils.extra_config.load_extra_path_config(str(config))
    folder_paths.set_input_directory(str(Path(args.input_dir).resolve()))
    if args.output_dir:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        folder_paths.set_output_directory(str(Path(args.output_dir).resolve()))
    resolve_checkpoint(prompt, args.ckpt)
    if args.mask:
        try:
            prompt[mask_loader(prompt)]["inputs"]["image"] = args.mask
        except ValueError as err:
            sys.exit(f"--mask {args.mask}: {err}")
    apply_overrides(prompt, args.set)

    start = time.time()
    try:
        comfy_runtime.run_prompt(prompt)
    except comfy_runtime.PromptError as err:
        print(f"the workflow failed: {err}", file=sys.stderr)
        return 1
    out_dir = Path(folder_paths.get_output_directory())
    written = sorted(p for p in out_dir.rglob("*.png") if p.stat().st_mtime >= start - 1)
    for path in written:
        print(f"wrote {path}")
    print(f"done in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
