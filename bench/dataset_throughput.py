"""Throughput of the dataset runner (scripts/dataset.py) against one item at a time, and Ray's scaling.

Every variant is a fresh command, timed from launch to exit (start-up and model loading included), on the same
manifest of --items items (the shipped geometry workflow at --size px, --steps inversion steps):

- one at a time: scripts/run_workflow.py once per item (a new process each: ComfyUI start, model load, one run);
- embedded: scripts/dataset.py (one process, the model loaded once, ComfyUI's cache kept across items);
- ray, 1 and 2 workers: scripts/dataset.py --engine ray (each actor starts ComfyUI and loads the model).

    python bench/dataset_throughput.py [--quick] [--ckpt tiny|PATH] [--items 6] [--size 128] [--variants one,embedded,ray1,ray2]

(--quick: 2 items at 64 px, one at a time and embedded.)

Default checkpoint: the tests' tiny SD1.5-inpainting file (tests/comfy_server.py, ~300 MB: full-size CLIP-L,
a one-level UNet, TAESD), so the figures weigh start-up and loading far more than a real model's would.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACK = Path(__file__).resolve().parents[1]


def tiny_checkpoint() -> Path:
    sys.path.insert(0, str(PACK / "tests"))
    import harness

    harness.start()
    import comfy_server

    return comfy_server.tiny_checkpoint(9)


def make_manifest(folder: Path, items: int, size: int) -> Path:
    from PIL import Image

    ex = PACK / "example_images"
    for name in ("crack_source.png", "target_brick.png", "target_hazelnut.png"):
        Image.open(ex / name).convert("RGB").resize((size, size), Image.LANCZOS).save(folder / name)
    Image.open(ex / "crack_mask.png").convert("L").resize((size, size), Image.NEAREST).save(folder / "crack_mask.png")
    rows = [{"id": f"i{i}", "source": "crack_source.png", "source_mask": "crack_mask.png",
             "target": ("target_brick.png", "target_hazelnut.png")[i % 2], "shift_x": 4 * i - 8, "shift_y": 0}
            for i in range(items)]
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and every process under it that has exited: not Ray's actors,
    whose CPU the runner's own 'per item in the workers' line reports)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}")
    for line in run.stdout.splitlines():
        if line.startswith("per item in the workers"):
            print(f"  {line}", flush=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - start, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 items at 64 px, variants one and embedded")
    p.add_argument("--ckpt", default="tiny")
    p.add_argument("--items", type=int, default=None, help="default 6 (--quick 2)")
    p.add_argument("--size", type=int, default=None, help="default 128 (--quick 64)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--variants", default=None, help="default one,embedded,ray1,ray2 (--quick one,embedded)")
    args = p.parse_args()
    args.items = args.items or (2 if args.quick else 6)
    args.size = args.size or (64 if args.quick else 128)
    args.variants = args.variants or ("one,embedded" if args.quick else "one,embedded,ray1,ray2")
    ckpt = str(tiny_checkpoint() if args.ckpt == "tiny" else Path(args.ckpt).resolve())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sets = ["--set", f"8.steps={args.steps}", "--set", "8.renoise_iterations=1"]
    folder = Path(tempfile.mkdtemp(prefix="ha-dataset-bench-"))
    manifest = make_manifest(folder, args.items, args.size)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    py = sys.executable
    results = {}
    for variant in args.variants.split(","):
        out = folder / variant
        if variant == "one":
            seconds = cpu = 0.0
            for r in rows:
                wall, used = timed([py, str(PACK / "scripts/run_workflow.py"), "--cpu", "--ckpt", ckpt, "--output-dir", str(out),
                                  "--source", str(folder / r["source"]), "--mask", str(folder / r["source_mask"]),
                                  "--target", str(folder / r["target"]), "--set", f"6.shift_x={r['shift_x']}", *sets],
                                 env)
                seconds, cpu = seconds + wall, cpu + used
        else:
            engine = ["--engine", "ray", "--workers", variant[-1]] if variant.startswith("ray") else []
            seconds, cpu = timed([py, str(PACK / "scripts/dataset.py"), str(manifest), "--out", str(out), "--cpu",
                             "--threads", "1", "--ckpt", ckpt, *sets, *engine], env)
        results[variant] = seconds, cpu
        print(f"{variant:9s} {seconds:7.1f} s wall {cpu:7.1f} s CPU  {60 * args.items / seconds:6.2f} items/min",
              flush=True)
    base = results.get("one")
    print("\n| variant | wall s | items/min | vs one at a time | CPU s | CPU s per item |\n|---|---|---|---|---|---|")
    for variant, (seconds, cpu) in results.items():
        ratio = f"{base[0] / seconds:.2f}x" if base else "n/a"
        print(f"| {variant} | {seconds:.1f} | {60 * args.items / seconds:.2f} | {ratio} | {cpu:.1f} | "
              f"{cpu / args.items:.1f} |")
    print(f"\n{args.items} items, {args.size} px, {args.steps} steps, 1 ReNoise iteration, 1 torch thread per process, "
          f"{os.cpu_count()} CPUs; checkpoint {Path(ckpt).name}")
    best = min((v for v in results if v != "one"), key=lambda v: results[v][0], default=None)
    if base and best:
        print(f"dataset_throughput_best_over_one={base[0] / results[best][0]:.2f} best={best}")
    else:  # no pair to compare: the items per minute of the fastest variant
        best = min(results, key=lambda v: results[v][0])
        print(f"dataset_throughput_items_per_min={60 * args.items / results[best][0]:.2f} best={best}")


if __name__ == "__main__":
    main()
