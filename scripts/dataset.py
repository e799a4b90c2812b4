"""Defect datasets at scale: a manifest of transfers -> composites with their exact masks, labels and provenance.

    python scripts/dataset.py manifest.csv --out dataset/ --ckpt sd-v1-5-inpainting.safetensors
    python scripts/dataset.py manifest.jsonl --out dataset/ --engine ray --workers 4 --set 8.steps=10

Each manifest row (CSV with a header, or JSON Lines) names a source image, its mask (the geometry to move: a
crack, a hole, droplets), a target image and optionally a target region mask (where the geometry may land); the
placement is given (shift_x, shift_y, scale, rotation: numbers) or drawn at random (a range "lo..hi" in CSV,
[lo, hi] in JSON; with a target region the shift is drawn so that the WHOLE moved mask lies inside it);
color_strength (a of eq. 1, number or range), seed and copies (how many draws). Paths are relative to the
manifest's folder. Optional columns: id, category, defect.

Every item runs the shipped geometry-transfer workflow (workflows/api/geometry_transfer.json, or --workflow) with
the item's images and placement, through ComfyUI's own executor, and writes (MVTec-AD layout):

    OUT/<category>/test/<defect>/<item>.png           the detail-preserving composite
    OUT/<category>/ground_truth/<defect>/<item>_mask.png   the exact M_geo (0/255)
    OUT/items/<item>.json                             placement drawn, settings, provenance, the COCO annotation
    OUT/coco.json                                     every finished item (segmentation as COCO RLE)
    OUT/failed.jsonl                                  this run's failed items with their errors

A second run skips finished items (those with items/<item>.json). Engines: `embedded` (default: one process, the
model loaded once, ComfyUI's cache reused across items) and `ray` (pip install "comfyui-harmonizing-attention[ray]":
one actor per GPU, or --workers CPU actors, each holding a started ComfyUI and the loaded model; items are handed
out as actors become free and every file is written by this process, so the layout is the same). The same manifest
gives the same files with either engine on the same kind of device and thread count (--threads).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import os
import re
import sys
import time
import traceback
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
import comfy_runtime  # noqa: E402
import run_workflow  # noqa: E402

PACK = comfy_runtime.PACK_ROOT
DEFAULT_WORKFLOW = PACK / "workflows" / "api" / "geometry_transfer.json"
PATHS = ("source", "source_mask", "target", "target_region")
NUMBERS = {"shift_x": 0.0, "shift_y": 0.0, "scale": 1.0, "rotation": 0.0, "color_strength": None}
KNOWN = {"id", "category", "defect", "seed", "copies", *PATHS, *NUMBERS}
ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ManifestError(ValueError):
    pass


# ---------------------------------------------------------------- the manifest

def read_manifest(path: Path) -> list[dict]:
    """Rows of a CSV (header line) or JSON Lines manifest, each with its line number under '_line'."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} not found")
    text = path.read_text()
    rows = []
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ManifestError(f"{path}:{n}: not a JSON object ({err.msg}); one object per line") from None
                if not isinstance(row, dict):
                    raise ManifestError(f"{path}:{n}: expected a JSON object per line, got {type(row).__name__}")
                rows.append({**row, "_line": n})
    else:
        reader = csv.DictReader(io.StringIO(text))
        for n, row in enumerate(reader, 2):
            rows.append({k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k} | {"_line": n})
    return rows


def _number(value, name: str, where: str):
    """A number, a (lo, hi) range ("lo..hi" or [lo, hi]), or None when empty."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and ".." in value:
        value = value.split("..", 1)
    try:
        if not isinstance(value, (list, tuple)):
            return float(value)
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ManifestError(f"{where}: {name} = {value!r} is neither a number nor a range like 10..40 "
                            "(JSON: [10, 40])") from None
    if lo > hi:
        raise ManifestError(f"{where}: {name} range {lo:g}..{hi:g} is reversed: write {hi:g}..{lo:g}")
    return [lo, hi]


def expand(rows: list[dict], base: Path) -> list[dict]:
    """One item per row and copy: {id, row, line (in the manifest), copy, seed, paths (absolute), numbers or ranges,
    category, defect}."""
    items, seen = [], {}
    for index, row in enumerate(rows):
        where = f"manifest line {row.get('_line', index + 1)}"
        unknown = sorted(set(row) - KNOWN - {"_line"})
        if unknown:
            raise ManifestError(f"{where}: unknown column(s) {unknown}; the columns are {sorted(KNOWN)}")
        missing = [k for k in ("source", "source_mask", "target") if not row.get(k)]
        if missing:
            raise ManifestError(f"{where}: {', '.join(missing)} missing (each row needs source, source_mask, target)")
        row_id = str(row.get("id") or f"{index + 1:05d}")
        if not ID.match(row_id):
            raise ManifestError(f"{where}: id {row_id!r}: use letters, digits, '.', '_' and '-' (it names files)")
        if row_id in seen:
            raise ManifestError(f"{where}: id {row_id!r} is also on line {seen[row_id]}: ids must be unique")
        seen[row_id] = row.get("_line", index + 1)
        try:
            seed, copies = int(row.get("seed") or 0), int(row.get("copies") or 1)
        except ValueError:
            raise ManifestError(f"{where}: seed and copies must be integers") from None
        if copies < 1:
            raise ManifestError(f"{where}: copies = {copies}: give 1 or more")
        numbers = {k: _number(row.get(k), k, where) for k in NUMBERS}
        if row.get("target_region") and (numbers["shift_x"] is not None or numbers["shift_y"] is not None):
            raise ManifestError(f"{where}: give either shift_x/shift_y or target_region (the shift is then drawn "
                                "inside the region), not both")
        paths = {k: str((base / row[k]).resolve()) if row.get(k) else None for k in PATHS}
        category = str(row.get("category") or "dataset")
        defect = str(row.get("defect") or Path(row["source"]).stem)
        for name, value in (("category", category), ("defect", defect)):
            if not ID.match(value):
                raise ManifestError(f"{where}: {name} {value!r}: use letters, digits, '.', '_' and '-' (a folder name)")
        for copy in range(copies):
            items.append({"id": f"{row_id}_{copy:03d}", "row": row_id, "line": row.get("_line", index + 1),
                          "copy": copy, "seed": seed, **paths, **numbers, "category": category, "defect": defect})
    return items


def item_files(item: dict) -> dict[str, str]:
    """Where an item's files go, relative to the output folder."""
    c, d, i = item["category"], item["defect"], item["id"]
    return {"image": f"{c}/test/{d}/{i}.png", "mask": f"{c}/ground_truth/{d}/{i}_mask.png",
            "record": f"items/{i}.json"}


def is_done(out: Path, item: dict) -> bool:
    return all((out / p).is_file() for p in item_files(item).values())


# ---------------------------------------------------------------- labels

def rle_encode(mask) -> dict:
    """COCO's compressed RLE of a binary [H,W] mask (column-major run lengths, first run of zeros, counts as
    pycocotools' string: 5-bit groups, deltas from the count two before): {"size": [h, w], "counts": str}."""
    import numpy as np

    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs
    chars = []
    for i, x in enumerate(runs):
        if i > 2:
            x -= runs[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            chars.append(chr(c + 48 + (0x20 if more else 0)))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": "".join(chars)}


def annotation(mask) -> dict:
    """{"segmentation": RLE, "area", "bbox": [x, y, w, h]} of a binary numpy [H,W] mask."""
    import numpy as np

    ys, xs = np.nonzero(mask)
    bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)] if xs.size else \
        [0, 0, 0, 0]
    return {"segmentation": rle_encode(mask), "area": int(mask.sum()), "bbox": bbox}


def write_coco(out: Path, items: list[dict]) -> dict:
    """coco.json from the records of every finished item, in manifest order (stable ids)."""
    records = [json.loads((out / item_files(it)["record"]).read_text()) for it in items if is_done(out, it)]
    names = sorted({(r["category"], r["defect"]) for r in records}, key=lambda cd: (cd[1], cd[0]))
    category_id = {cd: n for n, cd in enumerate(names, 1)}
    coco = {"info": {"description": "Harmonizing Attention synthetic defects (scripts/dataset.py)"},
            "categories": [{"id": category_id[cd], "name": cd[1], "supercategory": cd[0]} for cd in names],
            "images": [], "annotations": []}
    for n, r in enumerate(records, 1):
        coco["images"].append({"id": n, "file_name": r["image"], "width": r["width"], "height": r["height"],
                               "item": r["id"]})
        coco["annotations"].append({"id": n, "image_id": n, "category_id": category_id[(r["category"], r["defect"])],
                                    "iscrowd": 0, **r["annotation"]})
    _write(out / "coco.json", (json.dumps(coco, indent=1) + "\n").encode())
    return coco


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    tmp.replace(path)


# ---------------------------------------------------------------- one item (in the engine's process)

def _pack():
    """The pack as the package `harmonizing_attention` (its folder name is not an identifier)."""
    comfy_runtime.as_package()
    from harmonizing_attention.attention import edit, region

    return edit, region


def load_mask(path: str):
    """[H,W] float mask as the workflow's LoadImageMask (channel red) reads it."""
    import numpy as np
    import torch

    im = run_workflow.read_image(path)
    return torch.from_numpy(np.asarray(im.convert("RGBA").getchannel("R"), dtype=np.float32) / 255.0)


def check_inputs(items: list[dict], progress: bool = False) -> dict[str, str]:
    """{item id: what is wrong} for the items whose files cannot run, found before any model work: a file missing,
    truncated or not decodable (each file fully decoded once, truncated loading off: ComfyUI's LoadImage would
    retry a damaged file with it on and fill the missing rows with black), a source_mask not the source's size or
    empty, a target_region not the target's size."""
    import numpy as np
    from tqdm import tqdm

    files = sorted({item[k] for item in items for k in PATHS if item.get(k)})
    seen: dict[str, tuple | str] = {}  # path -> (width, height, has a pixel >= 0.5 in red) or the error
    for path in tqdm(files, desc="checking input files", unit="file", disable=not progress or len(files) < 50):
        try:
            im = run_workflow.read_image(path)
            red = np.asarray(im.convert("RGBA").getchannel("R"))
            seen[path] = (im.width, im.height, bool((red >= 128).any()))
        except ValueError as err:
            seen[path] = str(err)
    bad = {}
    for item in items:
        problems = [f"{k} {seen[item[k]]}" for k in PATHS if item.get(k) and isinstance(seen[item[k]], str)]
        if not problems:
            size = {k: seen[item[k]][:2] for k in PATHS if item.get(k)}
            for mask, image in (("source_mask", "source"), ("target_region", "target")):
                if mask in size and size[mask] != size[image]:
                    problems.append(f"{mask} {item[mask]} is {size[mask][0]}x{size[mask][1]} but {image} "
                                    f"{item[image]} is {size[image][0]}x{size[image][1]}: give the {mask} at its "
                                    f"{image}'s size")
            if not seen[item["source_mask"]][2]:
                problems.append(f"source_mask {item['source_mask']} is empty (no pixel >= 0.5 in its red channel): "
                                "paint the geometry to transfer")
        if problems:
            bad[item["id"]] = "; ".join(problems)
    return bad


def draw(item: dict, source_mask, target_region=None):
    """(Placement, color strength or None) of an item: ranges drawn from the item's own generator (seed, copy),
    in a fixed order, so any engine draws the same."""
    import numpy as np

    edit, region = _pack()
    rng = np.random.default_rng([int(item["seed"]), int(item["copy"])])

    def pick(name, default):
        value = item.get(name)
        if value is None:
            return default
        return float(rng.uniform(value[0], value[1])) if isinstance(value, list) else float(value)

    scale, rotation = pick("scale", 1.0), pick("rotation", 0.0)
    strength = pick("color_strength", None)
    if target_region is None:
        return edit.Placement(pick("shift_x", 0.0), pick("shift_y", 0.0), scale, rotation), strength
    base, offsets, area = region.candidate_shifts(source_mask, target_region, scale, rotation)
    while len(offsets):
        i = int(rng.integers(len(offsets)))
        dx, dy = offsets[i].tolist()
        placement = edit.Placement(base.shift_x + dx, base.shift_y + dy, scale, rotation)
        if region.fits(source_mask, target_region, placement, area):
            return placement, strength
        offsets = offsets[[j for j in range(len(offsets)) if j != i]]  # the warp's rounding left it: draw again
    h, w = target_region.shape
    raise ValueError(f"the target region ({w}x{h}) cannot hold the moved mask at scale {scale:g} and rotation "
                     f"{rotation:g}: paint a larger region or lower the scale")


def _the(prompt: dict, class_type: str, why: str) -> str:
    found = [k for k, v in prompt.items() if v["class_type"] == class_type]
    if len(found) != 1:
        raise ValueError(f"the workflow has {len(found)} {class_type} nodes; the dataset runner needs exactly one "
                         f"({why})")
    return found[0]


class Worker:
    """A started ComfyUI with the workflow's model loaded (on its first item) and an executor whose cache is kept
    across items: the embedded engine holds one, the Ray engine one per actor."""

    def __init__(self, config: dict):
        import torch

        self.config = config
        self._threads = torch.get_num_threads()
        if config.get("threads"):
            torch.set_num_threads(int(config["threads"]))
        _start_comfy(config["cpu"])
        self.prompt = json.loads(json.dumps(config["prompt"]))
        run_workflow.resolve_checkpoint(self.prompt, config["checkpoint"])
        self.edit = _the(self.prompt, "HA_GeometryImageEdit", "the geometry edit whose placement each item sets")
        self.composite = _the(self.prompt, "HA_DetailPreservingComposite", "each item's image is its output")
        colors = [k for k, v in self.prompt.items() if v["class_type"] == "HA_ColorShift"]
        self.color = colors[0] if len(colors) == 1 else None
        loaders = run_workflow.image_loaders(self.prompt)
        missing = [name for name in ("source", "source_mask", "target") if name not in loaders]
        if missing:
            raise ValueError(f"no LoadImage / LoadImageMask gives the {', '.join(missing)} of HA_GeometryImageEdit: "
                             "the dataset runner sets the files of those loaders")
        self.executor = comfy_runtime.new_executor()
        # LoadImage reads files under ComfyUI's input folder only (newer versions refuse other paths): point it at
        # the folder holding every file of the manifest, for this worker's life
        import folder_paths

        self._input_dir = folder_paths.get_input_directory()
        folder_paths.set_input_directory(config["input_root"])
        import comfy.model_management

        self.device = str(comfy.model_management.get_torch_device())

    def close(self) -> None:
        import folder_paths
        import torch

        torch.set_num_threads(self._threads)
        folder_paths.set_input_directory(self._input_dir)

    def process(self, item: dict) -> dict:
        """{"id", "ok", "files": {relative path: bytes}} or {"id", "ok": False, "error", "traceback"}; both with
        "seconds" and "cpu" (this process's CPU seconds) spent on the item."""
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            result = {"id": item["id"], "ok": True, "files": self._process(item)}
        except Exception as err:  # one item's failure is reported; the others go on
            result = {"id": item["id"], "ok": False, "error": f"{type(err).__name__}: {err}",
                      "traceback": traceback.format_exc(limit=-3)}
        return {**result, "seconds": time.perf_counter() - wall, "cpu": time.process_time() - cpu}

    def _process(self, item: dict) -> dict:
        import numpy as np
        import torch
        from PIL import Image

        # check_inputs found the files whole, the masks the right sizes and the source mask not empty
        source_mask = load_mask(item["source_mask"])
        region = load_mask(item["target_region"]) if item.get("target_region") else None
        placement, strength = draw(item, source_mask, region)

        prompt = json.loads(json.dumps(self.prompt))
        root = self.config["input_root"]
        run_workflow.set_images(prompt, {k: item[k] for k in ("source", "source_mask", "target")}, root, root)
        prompt[self.edit]["inputs"].update(shift_x=placement.shift_x, shift_y=placement.shift_y,
                                           scale=placement.scale, rotation=placement.rotation)
        if strength is not None:
            if self.color is None:
                raise ValueError("color_strength is set but the workflow has no single HA_ColorShift node")
            prompt[self.color]["inputs"]["strength"] = strength
        outputs = comfy_runtime.run_prompt(prompt, self.executor, [self.composite])
        image, geo_mask = outputs[self.composite][0], outputs[self.edit][1]
        if image.shape[0] != 1:
            raise ValueError(f"the workflow made {image.shape[0]} images for one item: one source and one target each")
        if region is not None:
            if tuple(geo_mask.shape[1:]) != tuple(region.shape):
                raise ValueError(f"target_region is {region.shape[1]}x{region.shape[0]} but the workflow placed the "
                                 f"geometry on a {geo_mask.shape[2]}x{geo_mask.shape[1]} canvas (it resizes the target): "
                                 "use a workflow that keeps the target's size, or give the region at that size")
            if ((geo_mask[0] > 0) & (region < 0.5)).any():
                raise RuntimeError("the moved mask left the target region")  # draw() checked this exact mask: a bug

        pixels = (image[0, ..., :3].float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
        mask = (geo_mask[0] > 0).cpu().numpy()
        files = item_files(item)
        record = {
            "id": item["id"], "row": item["row"], "copy": item["copy"], "seed": item["seed"],
            "category": item["category"], "defect": item["defect"],
            **{name: item[name] for name in PATHS},
            "placement": {"shift_x": placement.shift_x, "shift_y": placement.shift_y, "scale": placement.scale,
                          "rotation": placement.rotation},
            "color_strength": strength, "image": files["image"], "mask": files["mask"],
            "width": int(mask.shape[1]), "height": int(mask.shape[0]), "annotation": annotation(mask),
            "provenance": {**self.config["provenance"], "device": self.device, "torch": torch.__version__,
                           "threads": torch.get_num_threads(), "prompt": prompt},
        }
        return {files["image"]: _png(Image.fromarray(pixels)), files["mask"]: _png(Image.fromarray(mask.astype(np.uint8) * 255)),
                files["record"]: (json.dumps(record, indent=1) + "\n").encode()}


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _start_comfy(cpu: bool) -> None:
    """Start ComfyUI with the pack in this process, unless a host (a test session) already did."""
    nodes = sys.modules.get("nodes")
    if nodes is not None and "HA_DetailPreservingComposite" in getattr(nodes, "NODE_CLASS_MAPPINGS", {}):
        return
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # start-up chatter
    try:
        comfy_runtime.start(cpu=cpu)
    finally:
        logging.getLogger().setLevel(level)


# ---------------------------------------------------------------- engines

def embedded(config: dict, items: list[dict]):
    worker = Worker(config)
    try:
        for item in items:
            yield worker.process(item)
    finally:
        worker.close()


def ray_engine(config: dict, items: list[dict], workers: int | None = None, address: str | None = None):
    """One actor per GPU of the cluster (or `workers` CPU actors of `threads` CPUs each); items go to whichever
    actor is free; results come back here to be written."""
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise SystemExit('the ray engine needs Ray: pip install "comfyui-harmonizing-attention[ray]"') from None
    threads = int(config.get("threads") or 1)
    started = not ray.is_initialized()
    config = {**config, "threads": threads}
    if started:
        path = [str(SCRIPTS), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = {"PYTHONPATH": os.pathsep.join(path), "COMFYUI_PATH": str(comfy_runtime.find_comfyui())}
        local = {} if address else {"num_cpus": max(os.cpu_count() or 1, (workers or 1) * threads)}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env},
                 **local)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = workers or gpus or 1
        on_gpu = bool(gpus) and not config["cpu"]
        config["cpu"] = not on_gpu
        actor = ray.remote(num_cpus=threads, num_gpus=1 if on_gpu else 0)(Worker)
        actors = [actor.remote(config) for _ in range(count)]
        yield from ActorPool(actors).map_unordered(lambda a, item: a.process.remote(item), items)
        for a in actors:
            ray.kill(a)
    finally:
        if started:
            ray.shutdown()


ENGINES = ("embedded", "ray")


# ---------------------------------------------------------------- the run

def pack_version() -> str:
    text = (PACK / "pyproject.toml").read_text()
    found = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
    return found.group(1) if found else "unknown"


def file_sha256(path: Path, out: Path) -> str:
    """sha256 of the model file, remembered in OUT/.hashes.json by path, size and mtime (a 4 GB file takes a while)."""
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = out / ".hashes.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    if key not in cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        cache[key] = h.hexdigest()
        _write(cache_file, json.dumps(cache, indent=1).encode())
    return cache[key]


def _checkpoint(prompt: dict, ckpt: str | None) -> Path:
    """The checkpoint file the workflow will load (ComfyUI's folders and extra_model_paths.yaml are searched)."""
    root = comfy_runtime.find_comfyui()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import utils.extra_config  # before folder_paths' users; see comfy_runtime.start
    import folder_paths

    if (root / "extra_model_paths.yaml").is_file():
        utils.extra_config.load_extra_path_config(str(root / "extra_model_paths.yaml"))
    prompt = json.loads(json.dumps(prompt))
    run_workflow.resolve_checkpoint(prompt, ckpt)
    names = {n["inputs"]["ckpt_name"] for n in prompt.values() if n["class_type"] == "CheckpointLoaderSimple"}
    if len(names) != 1:
        raise ValueError(f"the workflow loads {len(names)} checkpoints; the dataset runner expects one")
    return Path(folder_paths.get_full_path("checkpoints", names.pop())).resolve()


def failure(manifest: Path, item: dict, error: str, traceback: str | None = None) -> dict:
    """A failed item's record (failed.jsonl): its error opens with the manifest file and line."""
    return {"id": item["id"], "line": item["line"], "error": f"{manifest.name} line {item['line']}: {error}",
            "traceback": traceback}


def run(manifest, out, *, engine: str = "embedded", ckpt: str | None = None, workflow=DEFAULT_WORKFLOW,
        overrides=(), cpu: bool = False, threads: int | None = None, workers: int | None = None,
        address: str | None = None, progress: bool = True, log=print) -> dict:
    """Run every unfinished item of the manifest into `out`. Returns {"items", "skipped", "done", "failed": [...]}."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: choose one of {ENGINES}")
    manifest, out = Path(manifest), Path(out)
    items = expand(read_manifest(manifest), manifest.resolve().parent)
    todo = [it for it in items if not is_done(out, it)]
    summary = {"items": len(items), "skipped": len(items) - len(todo), "done": 0, "failed": []}
    if not todo:
        write_coco(out, items)
        log(f"nothing to do: all {len(items)} items of {manifest} are in {out}")
        return summary
    prompt = json.loads(Path(workflow).read_text())
    run_workflow.apply_overrides(prompt, list(overrides))
    model = _checkpoint(prompt, ckpt)
    # every file decoded and every size checked before any model work: a bad item is reported with its manifest
    # line and files, nothing is written for it (a re-run tries it again) and the others run
    by_id = {it["id"]: it for it in items}
    failures = [failure(manifest, by_id[i], error) for i, error in check_inputs(todo, progress).items()]
    for f in failures:
        log(f"item {f['id']} failed: {f['error']}")
    todo = [it for it in todo if it["id"] not in {f["id"] for f in failures}]
    # items sharing a target, then a source, run back to back: ComfyUI's cache keeps their loaded images
    todo.sort(key=lambda it: (it["target"], it["source"], it["source_mask"], it["id"]))
    files = [it[k] for it in items for k in PATHS if it.get(k)]
    config = {"prompt": prompt, "checkpoint": str(model), "cpu": cpu, "threads": threads,
              "input_root": os.path.commonpath([os.path.dirname(f) for f in files]),
              "provenance": {"pack_version": pack_version(), "comfyui": comfy_runtime.find_comfyui().name,
                             "comfyui_version": _comfyui_version(), "workflow": Path(workflow).name,
                             "overrides": list(overrides), "model_file": model.name,
                             "model_sha256": file_sha256(model, out)}}
    log(f"{len(todo)} of {len(items)} items to run ({summary['skipped']} done before, {len(failures)} refused), "
        f"engine {engine}")
    results = (embedded(config, todo) if engine == "embedded" else ray_engine(config, todo, workers, address)) \
        if todo else iter(())
    start = time.time()
    timings = []
    try:
        from tqdm import tqdm

        bar = tqdm(results, total=len(todo), unit="item", disable=not progress)
        for result in bar:
            timings.append((result["seconds"], result["cpu"]))
            if result["ok"]:
                files = result["files"]
                for rel in sorted(files, key=lambda r: r.startswith("items/")):  # the record last: it marks done
                    _write(out / rel, files[rel])
                summary["done"] += 1
            else:
                item = by_id[result["id"]]
                files = ", ".join(f"{k} {item[k]}" for k in PATHS if item.get(k))
                failures.append(failure(manifest, item, f"{result['error']} (its files: {files})", result["traceback"]))
                bar.write(f"item {result['id']} failed: {failures[-1]['error']}")
    finally:
        write_coco(out, items)
        _write(out / "failed.jsonl", "".join(json.dumps(f) + "\n" for f in failures).encode())
    summary["failed"] = failures
    minutes = (time.time() - start) / 60
    log(f"{summary['done']} items written, {len(failures)} failed (see {out / 'failed.jsonl'}), "
        f"{summary['skipped']} skipped; {summary['done'] / minutes if minutes else 0:.1f} items/min")
    if timings:
        wall, cpu = (sorted(t[i] for t in timings)[len(timings) // 2] for i in (0, 1))
        log(f"per item in the workers (median): {wall:.2f} s, {cpu:.2f} CPU s; all items: "
            f"{sum(t[0] for t in timings):.1f} s, {sum(t[1] for t in timings):.1f} CPU s (the first on each worker "
            "loads the model)")
    return summary


def _comfyui_version() -> str:
    path = comfy_runtime.find_comfyui() / "comfyui_version.py"
    found = re.search(r'__version__\s*=\s*"([^"]+)"', path.read_text()) if path.is_file() else None
    return found.group(1) if found else "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("manifest", type=Path, help="CSV (with a header) or JSON Lines (.jsonl)")
    p.add_argument("--out", required=True, type=Path, help="output folder (finished items in it are skipped)")
    p.add_argument("--ckpt", help="checkpoint: a file name in ComfyUI's models/checkpoints or a .safetensors path "
                                  "(default: the workflow's own, SD1.5 inpainting)")
    p.add_argument("--workflow", type=Path, default=DEFAULT_WORKFLOW, help="an API-format geometry workflow with one "
                   "HA_GeometryImageEdit and one HA_DetailPreservingComposite (default: the shipped one)")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="override a widget for every item, e.g. 8.steps=10 (repeatable)")
    p.add_argument("--engine", choices=ENGINES, default="embedded")
    p.add_argument("--workers", type=int, help="ray: actors (default: one per GPU of the cluster, else 1)")
    p.add_argument("--address", help="ray: the cluster to join (default: start a local one)")
    p.add_argument("--threads", type=int, help="torch CPU threads per worker (ray default: 1)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        import torch

        cpu = args.cpu or not torch.cuda.is_available()
        summary = run(args.manifest, args.out, engine=args.engine, ckpt=args.ckpt, workflow=args.workflow,
                      overrides=args.set, cpu=cpu, threads=args.threads, workers=args.workers, address=args.address)
    except ManifestError as err:
        print(f"manifest error: {err}", file=sys.stderr)
        return 2
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    import dataset  # this file as the module `dataset`: Ray's workers import its classes by that name

    sys.exit(dataset.main())
