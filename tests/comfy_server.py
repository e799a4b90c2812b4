"""A real ComfyUI server (main.py) with this pack, for the app-level tests.

`tiny_checkpoint()` (scripts/tiny_checkpoint.py, re-exported here) writes a small random-weight SD1.5
checkpoint that CheckpointLoaderSimple detects as SD1.5 (inpainting: 9 input channels), so the shipped
workflows run as they are with only the checkpoint file being tiny.

`ComfyServer` runs `python main.py --cpu` in a subprocess with every folder ComfyUI writes to in
a temporary base directory (--base-directory), the pack linked into its custom_nodes/: the
ComfyUI source tree itself is only read, so no copy is needed.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PACK_ROOT / "scripts"))
from tiny_checkpoint import (  # noqa: E402,F401  (re-exported for the tests)
    CHECKPOINT_VERSION, PACK_NAME, TINY_UNET, tiny_checkpoint, write_checkpoint,
)

INPAINT_CKPT = "sd-v1-5-inpainting.safetensors"


def shipped_checkpoint_names() -> set[str]:
    names = set()
    for path in (PACK_ROOT / "workflows").glob("api/*.json"):
        for node in json.loads(path.read_text()).values():
            if node["class_type"] == "CheckpointLoaderSimple":
                names.add(node["inputs"]["ckpt_name"])
    return names


def shipped_checkpoints() -> dict[str, Path | None]:
    """{ckpt_name: tiny checkpoint} for every CheckpointLoaderSimple of the shipped workflows (an inpainting
    name gets the 9-channel model). SDXL names get None (an empty placeholder file, so the app's model list
    has the name): an SDXL checkpoint carries CLIP-G (700 M parameters), too large to build for a test."""
    return {name: None if "xl" in name.lower() else tiny_checkpoint(9 if "inpaint" in name.lower() else 4)
            for name in sorted(shipped_checkpoint_names())}


SEPARATE_LOADERS = {"UNETLoader": 0, "CLIPLoader": 1, "DualCLIPLoader": 1, "VAELoader": 2}  # -> HATest_TinyCheckpoint's
# the model folder of each file input of those loaders
LOADER_FILES = {"unet_name": "diffusion_models", "clip_name": "text_encoders", "clip_name1": "text_encoders",
                "clip_name2": "text_encoders", "vae_name": "vae"}
# the test pack's tiny model standing in for a loader, by the first of these fragments its (lower-case) file name holds
TINY_MODELS = (("flux2", "tiny-flux2"), ("flux", "tiny-flux-fill"), ("qwen_image", "tiny-qwen-image"),
               ("z_image", "tiny-z-image"), ("sd3", "tiny-sd3"))


def shipped_model_files() -> set[tuple[str, str]]:
    """(models/ folder, file name) of every file the shipped workflows' UNETLoader / CLIP / VAE loaders name: the
    test server lists them as empty placeholders (the app marks a loader whose file is missing)."""
    files = set()
    for path in (PACK_ROOT / "workflows").glob("api/*.json"):
        for node in json.loads(path.read_text()).values():
            if node["class_type"] in SEPARATE_LOADERS:
                files |= {(LOADER_FILES[k], v) for k, v in node["inputs"].items() if k in LOADER_FILES}
    return files


def runnable(base: Path, prompt: dict) -> bool:
    """Whether every checkpoint the prompt loads is a real (tiny) one on the server at `base` (a diffusion model
    loaded on its own, as Flux's UNETLoader, never is)."""
    if any(n["class_type"] in SEPARATE_LOADERS for n in prompt.values()):
        return False
    names = [n["inputs"]["ckpt_name"] for n in prompt.values() if n["class_type"] == "CheckpointLoaderSimple"]
    return all((base / "models" / "checkpoints" / name).is_symlink() for name in names)


def tiny_for(loader: dict) -> str:
    """The test pack's tiny model standing in for a shipped loader no tiny file can replace."""
    name = next(iter(loader["inputs"].values())).lower()
    return next((tiny for part, tiny in TINY_MODELS if part in name), "tiny-sdxl")


def missing_family(prompt: dict, vae: bool = True) -> str | None:
    """Why this ComfyUI cannot run the prompt with the test pack's tiny models (a family it lacks; with `vae`, or whose
    tiny VAE it cannot build), or None."""
    import harness

    tinies = {tiny for tiny, _, _ in loader_swaps(prompt).values() if tiny in harness.TINY_FAMILIES}
    return next(filter(None, (harness.family_missing(tiny, vae) for tiny in sorted(tinies))), None)


def loader_swaps(prompt: dict) -> dict[str, tuple[str, str, int | None]]:
    """Loader node -> (tiny model, the node that replaces it, its output slot there; None: the same slots) for
    the loaders of a prompt the server cannot run as shipped: a placeholder checkpoint (SDXL, SD3) becomes
    HATest_TinyCheckpoint; a UNETLoader does too, and the CLIP and VAE loaders beside it are rewired to its
    CLIP and VAE outputs."""
    swaps = {}
    unet = next((k for k, n in prompt.items() if n["class_type"] == "UNETLoader"), None)
    for node_id, node in prompt.items():
        if node["class_type"] == "CheckpointLoaderSimple":
            swaps[node_id] = (tiny_for(node), node_id, None)
        elif node["class_type"] in SEPARATE_LOADERS and unet is not None:
            swaps[node_id] = (tiny_for(prompt[unet]), unet, SEPARATE_LOADERS[node["class_type"]])
    return swaps


def swap_loaders(prompt: dict) -> dict:
    """`prompt` with loader_swaps applied (in place, and returned)."""
    swaps = loader_swaps(prompt)
    for node_id, (tiny, target, _) in swaps.items():
        if target == node_id:
            prompt[node_id] = {"class_type": "HATest_TinyCheckpoint", "inputs": {"ckpt_name": tiny}}
    for node_id, (_, target, _) in swaps.items():
        if target != node_id:
            del prompt[node_id]
    for node in prompt.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and value[0] in swaps and swaps[value[0]][1] != value[0]:
                node["inputs"][name] = [swaps[value[0]][1], swaps[value[0]][2]]
    return prompt


# ---------------------------------------------------------------- the server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_copy(image: Path, dest: Path, size: int = 64) -> None:
    """`image` downscaled to size x size: colours with Lanczos; a mask file and an alpha channel (the mask painted in
    the app's mask editor, LoadImage's MASK) nearest-neighbour, so they stay binary."""
    from PIL import Image

    with Image.open(image) as im:
        if "mask" in image.name:
            im.resize((size, size), Image.NEAREST).save(dest)
            return
        small = im.convert("RGB").resize((size, size), Image.LANCZOS)
        if "A" in im.getbands():
            small.putalpha(im.getchannel("A").resize((size, size), Image.NEAREST))
        small.save(dest)


def small_examples(folder: Path, size: int = 64) -> None:
    """The pack's example images under their shipped names, downscaled (the workflows load them by name)."""
    folder.mkdir(parents=True, exist_ok=True)
    for image in (PACK_ROOT / "example_images").glob("*.png"):
        small_copy(image, folder / image.name, size)


FRONTEND_SETTINGS = {
    "Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
    "Comfy.Notification.ShowVersionUpdates": False, "LiteGraph.Canvas.MinFontSizeForLOD": 1,
}


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM when the test process dies, so no server outlives a killed run."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class ServerError(RuntimeError):
    pass


class ComfyServer:
    """`python main.py --cpu` on a free port; every folder it writes to lies under `base`."""

    def __init__(self, comfy_root: Path, base: Path | None = None, checkpoints: dict[str, Path] | None = None,
                 image_size: int = 64, test_nodes: bool = True, extra_args: tuple = ()):
        self.root = Path(comfy_root)
        self.base = Path(base or tempfile.mkdtemp(prefix="ha-server-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        for name in ("custom_nodes", "models/checkpoints", "output", "input", "temp", "user"):
            (self.base / name).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_NAME
        if not link.exists():
            link.symlink_to(PACK_ROOT, target_is_directory=True)
        test_link = self.base / "custom_nodes" / "ha_test_nodes"
        if test_nodes and not test_link.exists():
            test_link.symlink_to(PACK_ROOT / "tests" / "server_nodes", target_is_directory=True)
        for name, path in (checkpoints or {}).items():
            target = self.base / "models" / "checkpoints" / name
            if path is None:
                target.touch()  # listed, never loaded
            elif not target.exists():
                target.symlink_to(path)
        for folder, name in shipped_model_files():  # listed, never loaded (the tests swap those loaders)
            (self.base / "models" / folder).mkdir(parents=True, exist_ok=True)
            (self.base / "models" / folder / name).touch()
        small_examples(self.base / "input", image_size)
        settings = self.base / "user" / "default" / "comfy.settings.json"
        if not settings.exists():  # the frontend as a returning user sees it: no template browser, no minimap
            settings.parent.mkdir(parents=True, exist_ok=True)
            settings.write_text(json.dumps(FRONTEND_SETTINGS))
        self.log_path = self.base / "server.log"
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None

    # -- lifecycle
    def start(self, timeout: float = 180.0) -> ComfyServer:
        cmd = [sys.executable, "-u", "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--use-pytorch-cross-attention", "--base-directory", str(self.base),
               "--output-directory", str(self.base / "output"), "--input-directory", str(self.base / "input"),
               "--temp-directory", str(self.base / "temp"), "--user-directory", str(self.base / "user"),
               # its default lies in the ComfyUI tree, which may be read-only (CI's ../shared)
               "--database-url", f"sqlite:///{self.base / 'user' / 'comfyui.db'}",
               "--disable-auto-launch", "--disable-metadata", *self.extra_args]
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "COMFYUI_PATH": str(self.root)}
        self._log = open(self.log_path, "w")  # noqa: SIM115  (closed in stop())
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                info = self.get("/object_info/HA_GeometryImageEdit", timeout=5)
                failed = [line for line in self.log().splitlines() if "IMPORT FAILED" in line and PACK_NAME in line]
                if "HA_GeometryImageEdit" in info and not failed:
                    return self
                raise ServerError(f"the server runs but the pack's nodes are missing or failed to import:\n{self.log_tail()}")
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise ServerError(f"ComfyUI did not answer /object_info within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log()[-chars:]

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    # -- HTTP
    def get(self, route: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + route, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, route: str, body: dict | None = None, timeout: float = 30):
        """(status, parsed JSON or None) of a POST; HTTP errors are returned, not raised."""
        data = json.dumps(body or {}).encode()
        req = urllib.request.Request(self.url + route, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as err:
            raw, status = err.read(), err.code
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    def queue(self, prompt: dict) -> str:
        """POST /prompt; the prompt id. Raises ServerError with the server's report when it refuses it."""
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": "ha-tests-" + uuid.uuid4().hex[:8]})
        if status != 200:
            raise ServerError(json.dumps(body))
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 120.0) -> dict:
        """The /history entry of a finished prompt (its status says whether it succeeded)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if not self.alive():
                raise ServerError(f"the server died:\n{self.log_tail()}")
            time.sleep(0.1)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 120.0) -> dict:
        return self.wait(self.queue(prompt), timeout)


def error_of(entry: dict) -> dict | None:
    """The execution_error message of a /history entry, None when it succeeded."""
    for event, data in entry["status"].get("messages", []):
        if event == "execution_error":
            return data
    return None


def output_images(entry: dict, node_id: str) -> list[dict]:
    return entry.get("outputs", {}).get(node_id, {}).get("images", [])
