"""Peak memory of a patched UNet forward against the plain one, as the latent grows (up to 128x128, SDXL's
1024 px): the growth must stay linear in the tokens (no N x N attention map).

What is measured:
- GPU: torch.cuda.max_memory_allocated() during the forward minus memory_allocated() before it (tensors
  allocated by the forward: activations, attention workspaces; weights excluded).
- CPU: the process's peak resident set size during the forward (a thread sampling /proc/self/statm every
  0.2 ms) minus the RSS just before it. glibc is told to serve allocations >= 64 KiB with mmap
  (mallopt M_MMAP_THRESHOLD) and malloc_trim runs before each forward, so freed tensors leave the RSS and
  each forward starts from the same floor. Sampling can miss a peak shorter than the interval, so the
  figure is a lower bound of the true peak; the same applies to plain and patched.
The growth exponent is the least-squares slope of log(peak) against log(tokens) (1 = linear, 2 = quadratic).

Modes: attention_overhead.py's, and `<mode>+balance`: the same rules with a balance (w = 4) on the
reference keys, which reaches the host's kernel as a [rows, 1, 1, keys] additive mask.

    python bench/memory.py [--quick] [--cpu] [--models tiny,sd15] [--sizes 32,64,96,128]
"""
from __future__ import annotations

import ctypes
import dataclasses
import math
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from attention_overhead import plan_for  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, so freed large blocks go back to the OS
        return libc
    except (OSError, AttributeError):
        return None


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Peak RSS above the level at entry, sampled by a background thread."""

    def __init__(self, libc, interval: float = 2e-4):
        self.libc, self.interval = libc, interval

    def __enter__(self):
        if self.libc is not None:
            self.libc.malloc_trim(0)
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self.peak = max(self.peak, _rss())
        self._stop.set()
        self._thread.join()
        self.used = self.peak - self.base


def peak_bytes(fn, device, libc) -> int:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        used = torch.cuda.max_memory_allocated(device) - before
        del out
        return used
    with PeakRSS(libc) as m:
        out = fn()
    del out
    return m.used


def balanced_plan(mode: str, size: int):
    """plan_for(mode), or with `+balance` the same rules with Balance(4) on every reference group."""
    from harmonizing_attention.attention.kv import Balance

    base, _, balanced = mode.partition("+")
    plan = plan_for(base, size)
    if not balanced:
        return plan
    rules = [None if refs is None else tuple(dataclasses.replace(ref, balance=Balance(4.0)) if i else ref
                                             for i, ref in enumerate(refs)) for refs in plan.rules(None)]
    return dataclasses.replace(plan, rules=lambda layer: rules)


def slope(xs, ys) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default=None, help="latent sizes (default 32,64,96,128; --quick 16,32,48)")
    p.add_argument("--modes", default="texture_aligning,geometry_preserving,cross_image,"
                                      "texture_aligning+balance,geometry_preserving+balance")
    args = p.parse_args(argv)
    libc = _libc()
    device = common.start(args.cpu, args.threads)
    from harmonizing_attention.nodes.patch import apply_plan

    sizes = [int(s) for s in (args.sizes or ("16,32,48" if args.quick else "32,64,96,128")).split(",")]
    repeats = args.repeats or (1 if args.quick else 2)
    models = common.models_arg(args) if args.models or device.type == "cuda" else ["tiny"]
    what = "peak allocated (torch.cuda)" if device.type == "cuda" else "peak RSS above the pre-forward level"
    print(f"# memory on {common.describe(device)}: {what}, max of {repeats} forwards", flush=True)
    rows_out, exponents = [], []
    for model_name in models:
        plain_model = common.build_model(model_name, device)
        for mode in args.modes.split(","):
            peaks = {"plain": [], "patched": []}
            for size in sizes:
                plan = balanced_plan(mode, size)
                patched_model = apply_plan(plain_model, plan)
                forward = common.Forward(plain_model, plan.rows, size, device)
                forward(plain_model)  # warm-up (first-call allocations)
                forward(patched_model)
                for name, m in (("plain", plain_model), ("patched", patched_model)):
                    runs = [peak_bytes(lambda m=m, f=forward: f(m), device, libc) for _ in range(repeats)]
                    peaks[name].append(max(runs))
                pl, pa = peaks["plain"][-1], peaks["patched"][-1]
                rows_out.append([model_name, mode, plan.rows, f"{size}x{size}", size * size,
                                 f"{pl / 2**20:.1f}", f"{pa / 2**20:.1f}", f"{pa / max(pl, 1):.2f}"])
                print(f"  {model_name} {mode} {size}x{size}: plain {pl / 2**20:.1f} MiB, patched {pa / 2**20:.1f} MiB",
                      flush=True)
            tokens = [s * s for s in sizes]
            e_plain = slope(tokens, [max(v, 1) for v in peaks["plain"]])
            e_patched = slope(tokens, [max(v, 1) for v in peaks["patched"]])
            exponents.append(e_patched)
            rows_out.append([model_name, mode, "", "growth exponent", "", f"{e_plain:.2f}", f"{e_patched:.2f}", ""])
        del plain_model
    print()
    print(common.table(["model", "mode", "rows", "latent", "tokens", "plain MiB", "patched MiB", "patched/plain"],
                       rows_out))
    print(f"memory_growth_exponent_patched_max={max(exponents):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
