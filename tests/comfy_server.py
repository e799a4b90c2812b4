"""A real ComfyUI server (main.py) with this pack, for the app-level tests.

`tiny_checkpoint()` writes a small random-weight SD1.5 checkpoint that CheckpointLoaderSimple
detects as SD1.5 (inpainting: 9 input channels) so the shipped workflows run as they are, with
only the checkpoint file being tiny: a reduced UNet at SD1.5's detection widths (model_channels 320,
context_dim 768), the full-size CLIP-L text encoder (CheckpointLoaderSimple always builds it at
full size) and a TAESD autoencoder as the VAE (ComfyUI detects it by its keys).

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
PACK_NAME = "comfyui-harmonizing-attention"
CHECKPOINT_VERSION = 2  # bump when the checkpoint layout changes: cached files are keyed by it
INPAINT_CKPT = "sd-v1-5-inpainting.safetensors"
# one level: SD1.5 detection fixes the width (320) and text width (768), not the depth
TINY_UNET = {"model_channels": 320, "context_dim": 768, "channel_mult": [1], "num_res_blocks": [1],
             "transformer_depth": [1], "transformer_depth_output": [1, 1],
             "transformer_depth_middle": 1, "num_heads": 8}


# ---------------------------------------------------------------- the checkpoint

def _random_state(module, prefix: str, gen, dtype) -> dict:
    """Seeded random weights for every tensor of `module` (scaled like a trained net's)."""
    import torch

    out = {}
    for name, t in module.state_dict().items():
        if name.endswith("bias"):
            v = torch.randn(t.shape, generator=gen) * 0.02
        elif ("norm" in name or "ln" in name.split(".")[-2:][0]) and t.ndim == 1:
            v = 1 + torch.randn(t.shape, generator=gen) * 0.02
        elif t.ndim == 0 or not t.dtype.is_floating_point:
            v = t.clone()
        else:
            fan_in = max(1, t[0].numel()) if t.ndim > 1 else t.numel()
            v = torch.randn(t.shape, generator=gen) / fan_in ** 0.5
        out[prefix + name] = v.to(dtype if v.dtype.is_floating_point else v.dtype).contiguous()
    return out


def write_checkpoint(path: Path, in_channels: int = 9, seed: int = 0) -> Path:
    """Write the tiny SD1.5(-inpainting) checkpoint to `path` (fp16 safetensors). Needs comfy importable."""
    import comfy.clip_model
    import comfy.ops
    import comfy.supported_models
    import comfy.taesd.taesd
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    config = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
              "adm_in_channels": None, "in_channels": in_channels, "out_channels": 4, "num_head_channels": -1,
              "use_linear_in_transformer": False, "use_temporal_resblock": False,
              "use_temporal_attention": False, **TINY_UNET}
    unet = comfy.supported_models.SD15(config).get_model({}).diffusion_model
    sd = _random_state(unet, "model.diffusion_model.", gen, torch.float16)
    del unet
    clip_config = json.loads((Path(comfy.clip_model.__file__).parent / "sd1_clip_config.json").read_text())
    clip = comfy.clip_model.CLIPTextModel(clip_config, torch.float32, "cpu", comfy.ops.disable_weight_init)
    sd.update(_random_state(clip, "cond_stage_model.transformer.", gen, torch.float16))
    del clip
    vae = comfy.taesd.taesd.TAESD(latent_channels=4)
    sd.update(_random_state(vae, "first_stage_model.", gen, torch.float16))
    # TAESD's last conv gives the pixels: mid-grey plus visible detail, not random weights' near-black
    last = "first_stage_model.taesd_decoder.19."
    sd[last + "bias"] = torch.full_like(sd[last + "bias"], 0.5)
    sd[last + "weight"] = sd[last + "weight"] * 8
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    save_file(sd, str(tmp))
    tmp.replace(path)
    return path


def tiny_checkpoint(in_channels: int = 9) -> Path:
    """The cached tiny checkpoint (written once per machine, ~5 s, ~300 MB: the CLIP-L text encoder)."""
    cache = Path(os.environ.get("HA_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                 / PACK_NAME)
    path = cache / f"tiny-sd15-{'inpaint' if in_channels == 9 else 'plain'}-v{CHECKPOINT_VERSION}.safetensors"
    if not path.is_file():
        write_checkpoint(path, in_channels)
    return path


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


def small_examples(folder: Path, size: int = 64) -> None:
    """The pack's example images under their shipped names, downscaled (the workflows load them by name)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for image in (PACK_ROOT / "example_images").glob("*.png"):
        with Image.open(image) as im:
            resample = Image.NEAREST if "mask" in image.name else Image.LANCZOS
            im.resize((size, size), resample).save(folder / image.name)


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
