"""Run a shipped workflow headlessly (no server, no browser) and write its output images.

    bash scripts/run.sh --ckpt sd-v1-5-inpainting.safetensors            the geometry transfer on the example images
    bash scripts/run.sh --source A.jpg --mask M.png --target B.jpg --ckpt sd-v1-5-inpainting.safetensors
    bash scripts/run.sh --check                                          check the install (a tiny random model)
    bash scripts/run.sh --workflow workflows/api/appearance_transfer.json --ckpt v1-5-pruned-emaonly.safetensors
    bash scripts/run.sh --ckpt ... --set 8.steps=10 --set 6.shift_x=40   change a widget (see --help for the list)

scripts/run.sh finds ComfyUI and a Python that can run it (building one the first time); where ComfyUI's packages are
installed, `python scripts/run_workflow.py` takes the same options. Everything that can be checked without ComfyUI's
packages (the options, the image files, the checkpoint) is checked first: `--preflight` does only that, with any
Python 3, and run.sh calls it before it builds an environment.
"""
from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import comfy_runtime  # noqa: E402

PACK = comfy_runtime.PACK_ROOT
DEFAULT_WORKFLOW = PACK / "workflows" / "api" / "geometry_transfer.json"
DEFAULT_INPUT_DIR = PACK / "example_images"
LOADERS = ("LoadImage", "LoadImageMask")
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
# the inputs of the pack's nodes that images are loaded for: what each option's file must be
IMAGE_ROLES = {
    "source": "the photo holding the geometry to move (a crack, a hole, a scratch...)",
    "source_mask": "white on the geometry in the source, black elsewhere (its red channel is read), the source's size",
    "target": "the photo that receives the geometry and keeps its own texture",
    "structure": "the image whose shape and layout the output keeps",
    "appearance": "the image whose colours and textures are transferred",
}
ALIASES = {"source_mask": "--mask"}  # the short name the README uses
# --check: steps, and the longest side the example images are scaled to (the shipped 25 steps x 5 ReNoise iterations
# at 512 px take many minutes on a CPU)
CHECK_STEPS, CHECK_SIZE = 4, 256


class Refused(SystemExit):
    """A readable refusal before anything runs: printed as it is, exit status 2."""

    def __init__(self, message: str):
        super().__init__(message)


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _node_order(node_id: str):
    return (0, int(node_id)) if node_id.isdigit() else (1, node_id)


# ---------------------------------------------------------------- the workflow's images

def _loader_of(prompt: dict, link) -> tuple[str, int] | None:
    """(node id, output slot) of the LoadImage / LoadImageMask whose output reaches `link`, through any nodes that are
    not the pack's (a GrowMask, an ImageScale...)."""
    todo, seen = [link], set()
    while todo:
        node_id, slot = todo.pop(0)
        if node_id in seen or node_id not in prompt:
            continue
        seen.add(node_id)
        node = prompt[node_id]
        if node["class_type"] in LOADERS:
            return node_id, slot
        if not node["class_type"].startswith("HA_"):
            todo += [v for v in node["inputs"].values() if isinstance(v, list)]
    return None


def image_loaders(prompt: dict) -> dict[str, list[tuple[str, int]]]:
    """{input name of a pack node (source, source_mask, target...): [(loader node id, output slot), ...]}: which
    loader gives each image the pack's nodes take, in node order."""
    found: dict[str, list[tuple[str, int]]] = {}
    for node_id in sorted(prompt, key=_node_order):
        node = prompt[node_id]
        if not node["class_type"].startswith("HA_"):
            continue
        for name, value in node["inputs"].items():
            loader = _loader_of(prompt, value) if isinstance(value, list) else None
            if loader and loader not in found.setdefault(name, []):
                found[name].append(loader)
    return found


def role_of(prompt: dict, node_id: str) -> str | None:
    """The role whose option gives a loader's file: the one reading its image (output 0) before one reading its alpha
    (a Load Image's MASK output gives the source and its painted mask)."""
    roles = sorted((slot, role) for role, loaders in image_loaders(prompt).items() for n, slot in loaders if n == node_id)
    return roles[0][1] if roles else None


def option(role: str) -> str:
    return ALIASES.get(role, "--" + role.replace("_", "-"))


def set_images(prompt: dict, files: dict[str, str], input_dir: str, root: str | None = None) -> str:
    """Point the workflow's image loaders at files anywhere on disk: `files` {role: path} replaces the file of each
    role's loaders, the others stay the workflow's own names under `input_dir`. ComfyUI reads images under its input
    folder only, so every loader gets its path relative to `root` (default: the folders' common parent), which the
    caller makes ComfyUI's input folder. A mask role fed by a LoadImage's MASK output (its alpha) gets a
    LoadImageMask of its own file (red channel). Returns the root."""
    roles = image_loaders(prompt)
    for role, path in files.items():
        for node_id, slot in roles.get(role, []):
            if prompt[node_id]["class_type"] == "LoadImage" and slot == 1:
                new_id = str(max(int(k) for k in prompt if k.isdigit()) + 1)
                prompt[new_id] = {"class_type": "LoadImageMask", "inputs": {"image": path, "channel": "red"}}
                for node in prompt.values():
                    for name, value in node["inputs"].items():
                        if value == [node_id, 1]:
                            node["inputs"][name] = [new_id, 0]
            else:
                prompt[node_id]["inputs"]["image"] = path
    paths = {node_id: os.path.abspath(os.path.join(input_dir, node["inputs"]["image"]))
             for node_id, node in prompt.items() if node["class_type"] in LOADERS}
    root = root or (os.path.commonpath([os.path.dirname(p) for p in paths.values()]) if paths else input_dir)
    for node_id, path in paths.items():
        prompt[node_id]["inputs"]["image"] = os.path.relpath(path, root)
    return root


def image_files(prompt: dict, root: str) -> dict[str, Path]:
    """{loader node id: the file it reads}."""
    return {node_id: Path(root) / node["inputs"]["image"]
            for node_id, node in prompt.items() if node["class_type"] in LOADERS}


def read_image(path):
    """The image at `path`, fully decoded, orientated as ComfyUI's loaders orientate it (EXIF), with truncated
    loading off: ComfyUI's LoadImage retries a damaged file with PIL's truncated loading on and gives black rows
    where the file ends. Raises ValueError naming the file and what is wrong."""
    from PIL import Image, ImageFile, ImageOps

    truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
            return im
    except FileNotFoundError:
        raise ValueError(f"{path} not found") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, UnicodeDecodeError... for damaged files
        what = "is truncated (it ends before its last pixel row)" if "truncated" in str(err) else \
            "cannot be decoded as an image"
        raise ValueError(f"{path} {what} ({type(err).__name__}: {err}): the file is damaged or not an image; "
                         "export or copy it again") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated


# ---------------------------------------------------------------- the checkpoint

_linked: dict[str, str] = {}  # resolved checkpoint path -> the name it is linked under


def _link_checkpoint(path: Path) -> str:
    """Make a checkpoint file anywhere on disk loadable by name: a fresh folder holding only a link to it, first
    among ComfyUI's checkpoint folders. (Adding the file's own folder would make ComfyUI list that folder's whole
    tree at every validation: a Downloads or cache folder holds thousands of files, and a file of the same name in
    models/checkpoints would win.)"""
    import folder_paths

    real = str(path.resolve())
    if real not in _linked:
        folder = Path(tempfile.mkdtemp(prefix="ha-checkpoint-"))
        atexit.register(shutil.rmtree, folder, True)
        (folder / path.name).symlink_to(real)
        folder_paths.add_model_folder_path("checkpoints", str(folder), is_default=True)
        _linked[real] = path.name
    return _linked[real]


def resolve_checkpoint(prompt: dict, ckpt: str | None, extra_paths_read: bool = True) -> None:
    """Point every checkpoint loader at `ckpt` (a name in ComfyUI's checkpoint folders or a .safetensors path); fail
    now, clearly, when the file is not there. extra_paths_read False: ComfyUI's extra_model_paths.yaml could not be
    read (no yaml module yet), so a name not found is let through for the full check later."""
    import folder_paths

    loaders = [n for n in prompt.values() if n["class_type"] == "CheckpointLoaderSimple"]
    if ckpt and not loaders:
        others = ", ".join(f"--set {k}.{name}=FILE ({prompt[k]['class_type']})" for k in sorted(prompt, key=_node_order)
                           for name in MODEL_FILES.get(prompt[k]["class_type"], {}))
        raise Refused(f"--ckpt sets the file of a Load Checkpoint node, and this workflow has none: it loads its model "
                      f"files with other loaders; set them with {others or '--set NODE.INPUT=FILE'}")
    for node in loaders:
        name = ckpt or node["inputs"]["ckpt_name"]
        path = Path(name).expanduser()
        if path.suffix and path.is_file():
            if path.suffix != ".safetensors":
                raise Refused(f"{path}: only .safetensors checkpoints are loaded (no pickle files); convert it first")
            name = _link_checkpoint(path)
        if folder_paths.get_full_path("checkpoints", name) is None and extra_paths_read:
            searched = "\n  ".join(folder_paths.get_folder_paths("checkpoints"))
            default = os.path.join(folder_paths.models_dir, "checkpoints")
            raise Refused(
                f"checkpoint '{name}' not found. Searched:\n  {searched}\n"
                f"Put the file in {default} or pass --ckpt /path/to/file.safetensors "
                "(the geometry workflow expects the SD1.5 inpainting checkpoint, e.g. sd-v1-5-inpainting.safetensors; "
                "to check the install without it: bash scripts/run.sh --check)."
            )
        node["inputs"]["ckpt_name"] = name


# the model files of the other loaders: class -> {widget: ComfyUI's models folder}
MODEL_FILES = {"UNETLoader": {"unet_name": "diffusion_models"}, "VAELoader": {"vae_name": "vae"},
               "CLIPLoader": {"clip_name": "text_encoders"},
               "DualCLIPLoader": {"clip_name1": "text_encoders", "clip_name2": "text_encoders"}}


def check_model_files(prompt: dict) -> None:
    """Every model file the workflow's other loaders read is in ComfyUI's model folders: one message for all missing."""
    import folder_paths

    missing = [(k, n["class_type"], name, n["inputs"][name], folder)
               for k, n in sorted(prompt.items(), key=lambda kv: _node_order(kv[0]))
               for name, folder in MODEL_FILES.get(n["class_type"], {}).items()
               if isinstance(n["inputs"].get(name), str) and folder_paths.get_full_path(folder, n["inputs"][name]) is None]
    if missing:
        lines = "\n  ".join(f"node {k} ({cls}) {name}: {file} in {os.path.join(folder_paths.models_dir, folder)}"
                            for k, cls, name, file, folder in missing)
        raise Refused(f"model files not found:\n  {lines}\nDownload them into those folders (the workflow's read-me "
                      "note and the README's model table link each file), or give another name with --set NODE.INPUT=FILE.")


def read_extra_model_paths() -> bool:
    """Read ComfyUI's extra_model_paths.yaml (the user's own model folders) as its main.py does. False when it exists
    but cannot be read yet (no yaml module: the environment is not built)."""
    config = comfy_runtime.find_comfyui() / "extra_model_paths.yaml"
    if not config.is_file():
        return True
    try:
        import utils.extra_config
    except ImportError:
        return False
    utils.extra_config.load_extra_path_config(str(config))
    return True


# ---------------------------------------------------------------- widgets

def _override(prompt: dict, item: str) -> tuple[str, str, object]:
    """(node id, input, value) of one --set NODE.INPUT=VALUE: the node must exist, the input be a widget of it (one
    the workflow sets, or any input of the node once ComfyUI is loaded: ComfyUI itself ignores unknown names), not a
    connection."""
    key, sep, value = item.partition("=")
    node_id, _, name = key.partition(".")
    if node_id not in prompt or not name or not sep:
        raise Refused(f"--set {item!r}: expected NODE.INPUT=VALUE with NODE one of "
                      f"{sorted(prompt, key=_node_order)} (see --help)")
    node = prompt[node_id]
    cls = getattr(sys.modules.get("nodes"), "NODE_CLASS_MAPPINGS", {}).get(node["class_type"])
    if cls is not None:
        types = cls.INPUT_TYPES()
        specs = {**types.get("required", {}), **types.get("optional", {})}
        if name not in specs:
            widgets = [k for k, spec in specs.items() if isinstance(spec[0], list) or spec[0] in WIDGET_TYPES]
            raise Refused(f"--set {item!r}: node {node_id} ({node['class_type']}) has no input {name!r}; its "
                          f"widgets: {', '.join(widgets) or 'none'}")
    if isinstance(node["inputs"].get(name), list):
        role = option(name) if name in image_loaders(prompt) else None
        raise Refused(f"--set {item!r}: {name} of node {node_id} is a connection, not a widget"
                      + (f"; give its image with {role} FILE" if role else ""))
    return node_id, name, _value(value)


def apply_overrides(prompt: dict, overrides: list[str]) -> None:
    """Apply --set NODE.INPUT=VALUE items (see _override for what is refused)."""
    for item in overrides:
        node_id, name, value = _override(prompt, item)
        prompt[node_id]["inputs"][name] = value


def for_check(prompt: dict) -> int:
    """--check's changes: fewer steps, one ReNoise iteration, noise-named outputs. Returns the checkpoint's input
    channels (9 for an inpainting loader name, else 4)."""
    channels = 4
    if not any(n["class_type"] == "CheckpointLoaderSimple" for n in prompt.values()):
        raise Refused("--check runs SD1.5 workflows only (a tiny SD1.5 checkpoint), and this one loads no checkpoint (its "
                      "model comes from other loaders): check the install with the default workflow")
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            name = inputs["ckpt_name"].lower()
            if "xl" in name or "flux" in name or "sd3" in name:
                raise Refused(f"--check runs SD1.5 workflows only (a tiny SD1.5 checkpoint); this one loads {name}")
            channels = 9 if "inpaint" in name else channels
        if "steps" in inputs and "renoise_iterations" in inputs:
            inputs.update(steps=CHECK_STEPS, renoise_iterations=1, renoise_average=1)
        if node["class_type"] == "SaveImage":
            inputs["filename_prefix"] = "harmonizing_attention/install_check_NOISE"
    return channels


def check_images(size: int = CHECK_SIZE) -> str:
    """--check's input folder: the example images scaled to `size` on their longest side (masks nearest-neighbour,
    so they stay black and white), in a temporary folder removed at exit."""
    from PIL import Image

    folder = tempfile.mkdtemp(prefix="ha-check-")
    atexit.register(shutil.rmtree, folder, True)
    for path in sorted(DEFAULT_INPUT_DIR.glob("*.png")):
        im = read_image(path)
        factor = size / max(im.size)
        resample = Image.NEAREST if im.mode in ("1", "L") else Image.LANCZOS
        im.resize((round(im.width * factor), round(im.height * factor)), resample).save(Path(folder) / path.name)
    return folder


# ---------------------------------------------------------------- options

def _read_workflow(path) -> dict:
    try:
        prompt = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise Refused(f"--workflow {path}: no such file (the shipped ones are in {PACK / 'workflows' / 'api'})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise Refused(f"--workflow {path}: not a JSON file ({err})") from None
    if not isinstance(prompt, dict) or not all(isinstance(n, dict) and "class_type" in n for n in prompt.values()):
        raise Refused(f"--workflow {path}: not an API-format workflow (ComfyUI: Workflow > Export (API)); the "
                      "shipped ones are in workflows/api/")
    return prompt


def _epilog(prompt: dict, workflow) -> str:
    roles = image_loaders(prompt)
    lines = [f"images of {workflow} (default files in --input-dir):"]
    for role, loaders in roles.items():
        alpha = " MASK (its alpha, painted in the mask editor)"
        nodes = ", ".join(f"node {n} {prompt[n]['class_type']}{alpha if s == 1 else ''}: {prompt[n]['inputs']['image']}"
                          for n, s in loaders)
        lines.append(f"  {option(role)} FILE   {nodes}")
        lines.append(f"      {IMAGE_ROLES.get(role, role)}")
    lines += ["", "widgets (--set NODE.INPUT=VALUE, a JSON value; optional inputs not listed can be set too):"]
    for node_id in sorted(prompt, key=_node_order):
        node = prompt[node_id]
        widgets = {k: v for k, v in node["inputs"].items() if not isinstance(v, list)}
        if node["class_type"] in LOADERS:
            continue
        if widgets:
            values = " ".join(f"{k}={json.dumps(v)}" for k, v in widgets.items())
            note = "  (or --ckpt)" if node["class_type"] == "CheckpointLoaderSimple" else ""
            lines.append(f"  {node_id:>3} {node['class_type']}: {values}{note}")
    lines += ["", "--check runs the workflow on a tiny random-weight checkpoint (built once, ~300 MB in "
              "~/.cache/comfyui-harmonizing-attention) with its steps lowered: it checks that everything runs; "
              "its image is noise."]
    return "\n".join(lines)


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--workflow", default=str(DEFAULT_WORKFLOW))
    known, _ = first.parse_known_args(argv)
    try:
        prompt, epilog = _read_workflow(known.workflow), None
    except Refused as err:
        prompt, epilog = {}, str(err)
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=epilog or _epilog(prompt, known.workflow))
    p.add_argument("--workflow", default=str(DEFAULT_WORKFLOW),
                   help="an API-format workflow (default: the geometry transfer)")
    for role in image_loaders(prompt):
        flags = [option(role)] + (["--" + role.replace("_", "-")] if role in ALIASES else [])
        p.add_argument(*flags, dest=f"image_{role}", metavar="FILE", help=f"{IMAGE_ROLES.get(role, role)} (any folder)")
    p.add_argument("--ckpt", help="checkpoint: a file name in ComfyUI's models/checkpoints, or a path to a "
                                  ".safetensors file (default: the workflow's own)")
    p.add_argument("--check", action="store_true",
                   help="check the install: run the workflow on a tiny random-weight model (its image is noise)")
    p.add_argument("--input-dir", default=str(DEFAULT_INPUT_DIR),
                   help="folder of the workflow's own image files (default: the pack's example_images/)")
    p.add_argument("--output-dir", help="where images are saved (default: ComfyUI's output folder)")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="override a widget value, e.g. 8.steps=10 (JSON values; repeatable; the list is below)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.add_argument("--verbose", action="store_true", help="show ComfyUI's own log (model loading...)")
    p.add_argument("--preflight", action="store_true", help=argparse.SUPPRESS)
    args, unknown = p.parse_known_args(argv)
    if unknown:
        images = ", ".join(option(r) for r in image_loaders(prompt)) or "none"
        p.error(f"unrecognized arguments: {' '.join(unknown)} (the images of {args.workflow}: {images})")
    args.images = {role[len("image_"):]: value for role, value in vars(args).items()
                   if role.startswith("image_") and value}
    return args


# ---------------------------------------------------------------- the run

def prepare(args) -> tuple[dict, str]:
    """Everything checked before ComfyUI starts, with the standard library and ComfyUI's folder_paths only (so any
    Python 3 can run it, before an environment is built): the workflow, the image files, the widgets named, the
    checkpoint. Returns (the prompt ready to run, the folder to make ComfyUI's input folder)."""
    prompt = _read_workflow(args.workflow)
    if args.check and args.ckpt:
        raise Refused("--check runs a tiny random-weight checkpoint of its own: leave --ckpt out")
    if not Path(args.input_dir).is_dir():
        raise Refused(f"--input-dir {args.input_dir}: no such folder")
    for role, path in args.images.items():
        if not Path(path).is_file():
            raise Refused(f"{option(role)} {path}: no such file")
    if args.check:
        args.check_channels = for_check(prompt)
    apply_overrides(prompt, args.set)  # before set_images: an `image` set here is a name in --input-dir
    files = {role: str(Path(path).resolve()) for role, path in args.images.items()}
    root = set_images(prompt, files, args.input_dir)
    for node_id, path in image_files(prompt, root).items():
        if not path.is_file():
            role = role_of(prompt, node_id)
            raise Refused(f"node {node_id} ({prompt[node_id]['class_type']}) reads {path.name}, which is not in "
                          f"{args.input_dir}: " + (f"give the file with {option(role)} FILE" if role else
                                                   f"give --input-dir or --set {node_id}.image=NAME"))
    comfy_runtime.configure(cpu=True)  # folder_paths needs ComfyUI's options; start() sets the device later
    extra = read_extra_model_paths()
    if not args.check:
        resolve_checkpoint(prompt, args.ckpt, extra_paths_read=extra)
        if extra:
            check_model_files(prompt)
    return prompt, root


class _QuietValidation(logging.Filter):
    """ComfyUI logs a refused prompt's report line by line; the command prints it once, in words (--verbose keeps
    ComfyUI's)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.module == "execution" and record.funcName == "validate_prompt")


class Progress:
    """What the run shows: a line per node as it starts and a bar over each node's steps (ComfyUI's ProgressBar)."""

    def __init__(self, prompt: dict):
        self.prompt, self.bar, self.node, self.started = prompt, None, None, time.time()

    def _label(self, node_id) -> str:
        node = self.prompt.get(str(node_id), {})
        return f"node {node_id} {node.get('_meta', {}).get('title') or node.get('class_type', '')}".rstrip()

    def _close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def event(self, event: str, data: dict) -> None:
        if event == "executing" and data.get("node") is not None:
            self._close()
            self.node = data["node"]
            print(f"[{time.time() - self.started:6.1f} s] {self._label(self.node)}", file=sys.stderr, flush=True)

    def step(self, value, total, preview=None, node_id=None) -> None:
        from tqdm import tqdm

        if self.bar is None or self.bar.total != total or value < self.bar.n:
            self._close()
            self.bar = tqdm(total=total, desc=f"  {self.prompt.get(str(self.node), {}).get('class_type', 'steps')}",
                            unit="step", file=sys.stderr, leave=True, mininterval=0.5)
        self.bar.update(value - self.bar.n)

    def close(self):
        self._close()


def describe(err: comfy_runtime.PromptError, prompt: dict, root: str) -> str:
    """A PromptError as lines a user reads: each refused node with its input and message, or the node that failed."""
    details = err.details
    if "node_errors" not in details:
        node = details.get("node_id")
        return (f"the workflow stopped at node {node} ({details.get('node_type')}): "
                f"{details.get('exception_message', str(err)).strip()}")
    lines = ["the workflow was refused before it ran:"]
    for node_id, info in sorted(details["node_errors"].items(), key=lambda kv: _node_order(kv[0])):
        seen = set()
        for e in info.get("errors", []):
            name = e.get("extra_info", {}).get("input_name")
            text = str(e.get("details", ""))
            shown = name
            if e.get("type") == "custom_validation_failed" and name and text.startswith(f"{name} - "):
                # a node's own check: ComfyUI repeats its message once per input the check names, under each name
                message, shown = text[len(name) + 3:], None
            else:
                message = f"{e.get('message')}: {text}" if text else e.get("message")
            if message in seen:
                continue
            seen.add(message)
            lines.append(f"  node {node_id} ({info.get('class_type')}){' ' + shown if shown else ''}: {message}")
            if info.get("class_type") in LOADERS and name == "image":
                role = role_of(prompt, node_id)
                lines.append(f"    it reads files under {root}; give the file with "
                             + (f"{option(role)} FILE" if role else "--input-dir"))
    if len(lines) == 1:
        error = details.get("error") or {}
        lines.append(f"  {error.get('message')}: {error.get('details')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check and not args.preflight and not args.images and Path(args.input_dir) == DEFAULT_INPUT_DIR:
        args.input_dir = check_images()
    try:
        prompt, root = prepare(args)
    except Refused as err:
        print(err, file=sys.stderr)
        return 2
    if args.preflight:
        return 0
    roles = {n: role for role, loaders in image_loaders(prompt).items() for n, _ in loaders}
    for node_id, path in image_files(prompt, root).items():
        try:
            read_image(path)
        except ValueError as err:
            which = option(roles[node_id]) if node_id in roles else f"node {node_id} ({prompt[node_id]['class_type']})"
            print(f"{which}: {err}", file=sys.stderr)
            return 2

    import torch

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger().setLevel(logging.ERROR)  # ComfyUI's start-up chatter (e.g. optional audio nodes)
    comfy_runtime.start(cpu=args.cpu or not torch.cuda.is_available())
    logging.getLogger().setLevel(logging.INFO if args.verbose else logging.WARNING)
    if not args.verbose:
        logging.getLogger().addFilter(_QuietValidation())
    import comfy.utils
    import folder_paths

    folder_paths.set_input_directory(root)
    if args.output_dir:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        folder_paths.set_output_directory(str(Path(args.output_dir).resolve()))
    try:
        if args.check:
            import tiny_checkpoint

            path = tiny_checkpoint.cache_dir() / "tiny"  # for the message only
            if not any(tiny_checkpoint.cache_dir().glob("tiny-sd15-*.safetensors")):
                print(f"building the tiny random-weight checkpoint (once, ~300 MB in {path.parent})", file=sys.stderr)
            resolve_checkpoint(prompt, str(tiny_checkpoint.tiny_checkpoint(args.check_channels)))
        for item in args.set:  # the names again, now that ComfyUI knows every node's inputs
            _override(prompt, item)
    except Refused as err:
        print(err, file=sys.stderr)
        return 2

    start = time.time()
    progress = Progress(prompt)
    comfy.utils.set_progress_bar_global_hook(progress.step)
    try:
        comfy_runtime.run_prompt(prompt, on_event=progress.event)
    except comfy_runtime.PromptError as err:
        progress.close()
        print(describe(err, prompt, root), file=sys.stderr)
        return 1
    finally:
        progress.close()
        comfy.utils.set_progress_bar_global_hook(None)
    out_dir = Path(folder_paths.get_output_directory())
    written = sorted(p for p in out_dir.rglob("*.png") if p.stat().st_mtime >= start - 1)
    for path in written:
        print(f"wrote {path}")
    print(f"done in {time.time() - start:.1f} s")
    if args.check:
        print(f"install check passed: every node of {Path(args.workflow).name} ran, on a tiny random-weight model "
              f"with {CHECK_STEPS} steps" + ("" if args.images else f", the example images at {CHECK_SIZE} px") +
              ". Its image is NOISE by design (random weights), not a result. For a real result: "
              "bash scripts/run.sh --ckpt sd-v1-5-inpainting.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
