"""Harmonizing Attention's evaluation protocol (paper section 4.2 / Table 2) on your own data.

Every source (image + mask) is composed onto every target through the geometry-transfer pipeline (the
functions the nodes call: place the masked source, colour shift (eq. 1), texture-aligning inversion, latent
blend, geometry-preserving generation, VAE decode). The composites are written as PNGs with a metrics table
(metrics.csv, metrics.md): LPIPS, DISTS and CLIP on the background and the foreground (see
attention/metrics.py for the regions), and PSNR / MSE / fMSE against the naive composite (the target
outside M_geo, the transformed source inside it).

    python scripts/evaluate.py --sources SRC_DIR --targets TAR_DIR --checkpoint sd-v1-5-inpainting.ckpt \\
        --out results/ [--masks MASK_DIR] [--placement keep|centre|shift] [--steps 25] [--size 512] [--composite]

Sources: SRC_DIR/name.png with its mask SRC_DIR/name_mask.png beside it (or MASK_DIR/name.png, or
MASK_DIR/name_mask.png). Images are centre-cropped to a square and resized to --size (the paper crops to
512 x 512). The perceptual metrics need `pip install "comfyui-harmonizing-attention[eval]"` and their
pretrained weights on disk (--allow-download fetches them once); without them the tool says what is
missing and still reports the pixel metrics.

Python API (used by the tests, with models already in memory): `evaluate(model, clip, vae, sources,
targets, out_dir, ...)`.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
PLACEMENTS = ("keep", "centre", "shift")
PIXEL = ("psnr", "mse", "fmse")


@dataclass(frozen=True)
class Settings:
    size: int = 512
    placement: str = "keep"  # keep: same relative position; centre: bbox centre to the image centre; shift
    shift_x: float = 0.0
    shift_y: float = 0.0
    scale: float = 1.0
    rotation: float = 0.0
    color_strength: float = 0.5  # a of eq. 1 (paper: 0.5)
    ring_width: int = 8
    steps: int = 25  # paper: 25 DDIM steps
    iterations: int = 5  # paper: 5 ReNoise iterations
    cfg: float = 1.0
    prompt: str = ""  # paper: the empty prompt
    feather: float = 0.0
    # HA_DetailPreservingComposite as the last step: the target's own pixels outside the blend band
    composite: bool = False
    composite_feather: float = 4.0
    composite_levels: int = 3


def _pack():
    """The pack as the package `harmonizing_attention` (its folder name is not an identifier)."""
    sys.path.insert(0, str(PACK_ROOT / "scripts"))
    import comfy_runtime

    comfy_runtime.as_package()
    import harmonizing_attention.attention.metrics as metrics
    from harmonizing_attention.attention import color, edit
    from harmonizing_attention.nodes import pipeline

    return metrics, color, edit, pipeline


# ---------------------------------------------------------------- data

def square(image, size: int, mode: str = "bilinear"):
    """Centre-crop [1,H,W,C] to a square and resize to size x size."""
    import torch.nn.functional as F

    h, w = image.shape[1:3]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    x = image[:, y0:y0 + s, x0:x0 + s].permute(0, 3, 1, 2)
    if s != size:
        x = F.interpolate(x, size=(size, size), mode=mode, **({"antialias": True} if mode == "bilinear" else {}))
    return x.permute(0, 2, 3, 1)


def load_image(path: Path, channels: str = "RGB"):
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im.convert(channels), dtype=np.float32) / 255.0
    t = torch.from_numpy(a)
    return (t if t.dim() == 3 else t[..., None])[None]


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder of images")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def load_sources(folder: Path, masks: Path | None, size: int) -> list[tuple[str, object, object]]:
    """[(name, image [1,S,S,3], mask [1,S,S])] ; the mask beside (name_mask.png) or in `masks`."""
    out = []
    for path in _images(folder):
        if path.stem.endswith("_mask"):
            continue
        candidates = [path.with_name(f"{path.stem}_mask{path.suffix}"), path.with_name(f"{path.stem}_mask.png")]
        if masks is not None:
            candidates = [masks / f"{path.stem}{path.suffix}", masks / f"{path.stem}.png",
                          masks / f"{path.stem}_mask.png"] + candidates
        mask_path = next((c for c in candidates if c.is_file()), None)
        if mask_path is None:
            raise ValueError(f"no mask for source {path.name}: looked for " + ", ".join(str(c) for c in candidates)
                             + ". Save the mask as name_mask.png beside the source or pass --masks FOLDER")
        image = square(load_image(path), size)
        mask = (square(load_image(mask_path, "L"), size, "nearest")[..., 0] >= 0.5).float()
        out.append((path.stem, image, mask))
    if not out:
        raise ValueError(f"no source image in {folder} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return out


def load_targets(folder: Path, size: int) -> list[tuple[str, object]]:
    out = [(p.stem, square(load_image(p), size)) for p in _images(folder) if not p.stem.endswith("_mask")]
    if not out:
        raise ValueError(f"no target image in {folder} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return out


def save_image(image, path: Path) -> None:
    import numpy as np
    from PIL import Image

    Image.fromarray((image[0].clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)).save(path)


# ---------------------------------------------------------------- one composite

def placement_for(settings: Settings, mask, edit):
    """The edit T: keep (anchor at the same relative position), centre (anchor to the image centre), or
    shift (settings' shift / scale / rotation)."""
    if settings.placement not in PLACEMENTS:
        raise ValueError(f"placement {settings.placement!r}: choose one of {PLACEMENTS}")
    if settings.placement == "keep":
        return edit.Placement(scale=settings.scale, rotation=settings.rotation)
    if settings.placement == "centre":
        ax, ay = edit.mask_anchor(mask[0])
        h, w = mask.shape[-2:]
        return edit.Placement(shift_x=(w - 1) / 2 - ax, shift_y=(h - 1) / 2 - ay, scale=settings.scale,
                              rotation=settings.rotation)
    return edit.Placement(shift_x=settings.shift_x, shift_y=settings.shift_y, scale=settings.scale,
                          rotation=settings.rotation)


def compose(model, clip, vae, source, mask, target, settings: Settings):
    """(output [1,S,S,3], geometry image [1,S,S,3], M_geo [1,S,S]): one geometry transfer."""
    metrics, color, edit, pipeline = _pack()
    geometry, geometry_mask = edit.place_source(source, mask, target, placement_for(settings, mask, edit))
    scene = pipeline.Scene(source=source, source_mask=edit.binarize(mask), target=target, geometry=geometry,
                           geometry_mask=geometry_mask)
    shifted = color.mean_shift(geometry, geometry_mask, source, mask, target, settings.color_strength,
                               settings.ring_width)
    scene = dataclasses.replace(scene, geometry=shifted)
    conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(settings.prompt))
    inverted = pipeline.invert(model, vae, conditioning, scene, settings.steps, settings.iterations, 1,
                               "texture_aligning")
    inverted = pipeline.blend_latents(inverted, settings.feather)
    latents, _ = pipeline.generate(model, conditioning, conditioning, inverted, settings.cfg, "geometry_preserving")
    output = vae.decode(latents)[..., :3].float().cpu()
    if settings.composite:
        from harmonizing_attention.attention import composite

        output = composite.composite(output, target, geometry_mask, settings.composite_feather,
                                     settings.composite_levels)
    return output, geometry, geometry_mask


# ---------------------------------------------------------------- the protocol

def evaluate(model, clip, vae, sources, targets, out_dir, settings: Settings = Settings(),
             metric_names=None, allow_download: bool = False, clip_model: str | None = None, log=print) -> dict:
    """Run every source x target, write composites and metrics.{csv,md} into out_dir.

    sources: [(name, image [1,S,S,3], mask [1,S,S])]; targets: [(name, image [1,S,S,3])], all S x S.
    Returns {"rows": per-composite dicts, "mean": dict, "missing": {metric: what to install}, "columns": [...],
    "composites": {(source, target): output [1,S,S,3]}}.
    """
    import torch

    metrics = _pack()[0]
    out_dir = Path(out_dir)
    (out_dir / "composites").mkdir(parents=True, exist_ok=True)
    names = metrics.PERCEPTUAL if metric_names is None else tuple(metric_names)
    device = "cpu"
    try:
        import comfy.model_management

        device = comfy.model_management.get_torch_device()
    except ImportError:
        pass
    backbones, missing = metrics.load_backbones(names, device, allow_download, clip_model or metrics.DEFAULT_CLIP)
    for name, why in missing.items():
        log(f"{name.upper()} not computed: {why}")
    columns = ["source", "target"] + [f"{n}_{r}" for n in names for r in ("bg", "fg")] + list(PIXEL)
    rows, composites = [], {}
    total = len(sources) * len(targets)
    for s_name, source, mask in sources:
        for t_name, target in targets:
            with torch.inference_mode():  # as ComfyUI runs nodes
                output, geometry, geometry_mask = compose(model, clip, vae, source, mask, target, settings)
            save_image(output, out_dir / "composites" / f"{s_name}__{t_name}.png")
            composites[(s_name, t_name)] = output
            row = {"source": s_name, "target": t_name}
            for k, v in metrics.pixel_metrics(output, geometry, geometry_mask).items():
                row[k] = float(v[0])
            for k, v in metrics.perceptual_metrics(backbones, output, target, geometry, geometry_mask).items():
                row[k] = v[0]
            rows.append(row)
            log(f"[{len(rows)}/{total}] {s_name} x {t_name}: " + ", ".join(
                f"{k} {row[k]:.4f}" for k in columns[2:] if k in row))
    mean = {"source": "mean", "target": f"{len(rows)} composites"}
    for k in columns[2:]:
        values = [r[k] for r in rows if k in r and math.isfinite(r[k])]
        if values:
            mean[k] = statistics.fmean(values)
    write_tables(out_dir, columns, rows, mean, missing)
    return {"rows": rows, "mean": mean, "missing": missing, "columns": columns, "composites": composites}


def _fmt(v) -> str:
    if isinstance(v, str):
        return v
    if v is None:
        return "n/a"
    return f"{v:.4f}" if math.isfinite(v) else str(v)


def write_tables(out_dir: Path, columns, rows, mean, missing) -> None:
    """metrics.csv (one row per composite, then the mean; empty cells: not computed) and metrics.md."""
    with open(out_dir / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows + [mean]:
            w.writerow([r.get(c, "") if isinstance(r.get(c), str) else ("" if c not in r else repr(r[c]))
                        for c in columns])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in [mean] + rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    notes = ["", "Lower is better: LPIPS, DISTS, MSE, fMSE; higher is better: CLIP, PSNR. (bg): both images with "
             "M_geo blacked out, output vs target; (fg): the bounding box of M_geo, output vs the naive composite; "
             "PSNR / MSE / fMSE (inside M_geo): output vs the naive composite, 0..255 scale."]
    notes += [f"- {name.upper()} not computed: {why}" for name, why in missing.items()]
    (out_dir / "metrics.md").write_text("\n".join(lines + notes) + "\n")


# ---------------------------------------------------------------- command line

def load_checkpoint(spec: str):
    """(MODEL, CLIP, VAE) from a checkpoint path, or a name in ComfyUI's checkpoints folders."""
    import comfy.sd
    import folder_paths

    path = Path(spec)
    if not path.is_file():
        found = folder_paths.get_full_path("checkpoints", spec)
        if found is None:
            raise ValueError(f"checkpoint {spec!r} is neither a file nor in ComfyUI's checkpoints folders "
                             f"({', '.join(folder_paths.get_folder_paths('checkpoints'))}): give its path")
        path = Path(found)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors checkpoints are loaded (no pickle files); convert it first")
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(path), output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings"))
    return model, clip, vae


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sources", required=True, type=Path, help="folder of source images (+ name_mask.png)")
    p.add_argument("--targets", required=True, type=Path, help="folder of target (background) images")
    p.add_argument("--masks", type=Path, default=None, help="folder of source masks (name.png or name_mask.png)")
    p.add_argument("--checkpoint", required=True, help="checkpoint path or name (paper: SD1.5 inpainting)")
    p.add_argument("--out", required=True, type=Path, help="output folder: composites/, metrics.csv, metrics.md")
    d = Settings()
    p.add_argument("--placement", choices=PLACEMENTS, default=d.placement,
                   help="keep: the mask's bbox centre at the same relative position; centre: at the image centre; "
                        "shift: moved by --shift-x/--shift-y pixels")
    for name in ("shift_x", "shift_y", "scale", "rotation", "color_strength", "cfg", "feather"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    for name in ("size", "steps", "iterations", "ring_width"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--composite", action="store_true",
                   help="finish with the detail-preserving composite (HA_DetailPreservingComposite): the target's own "
                        "pixels outside a blend band around M_geo")
    p.add_argument("--composite-feather", type=float, default=d.composite_feather)
    p.add_argument("--composite-levels", type=int, default=d.composite_levels)
    p.add_argument("--prompt", default=d.prompt)
    p.add_argument("--metrics", default=",".join(("lpips", "dists", "clip")),
                   help="perceptual metrics (pixel metrics are always computed); '' for none")
    p.add_argument("--clip-model", default=None, help="CLIP for the CLIP score (default openai/clip-vit-large-patch14)")
    p.add_argument("--allow-download", action="store_true", help="let the metric packages fetch their weights")
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args(argv)
    if args.size % 8:
        p.error(f"--size {args.size} is not a multiple of 8 (the VAE's downscale): use e.g. 512")

    sys.path.insert(0, str(PACK_ROOT / "scripts"))
    import comfy_runtime

    comfy_runtime.start(cpu=args.cpu)
    settings = Settings(**{k: getattr(args, k) for k in Settings.__dataclass_fields__})
    sources = load_sources(args.sources, args.masks, args.size)
    targets = load_targets(args.targets, args.size)
    model, clip, vae = load_checkpoint(args.checkpoint)
    names = [n for n in args.metrics.split(",") if n]
    result = evaluate(model, clip, vae, sources, targets, args.out, settings, names, args.allow_download,
                      args.clip_model)
    print((args.out / "metrics.md").read_text())
    if result["missing"]:
        print("Missing perceptual metrics (pixel metrics were computed): "
              + "; ".join(f"{k}: {v}" for k, v in result["missing"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
