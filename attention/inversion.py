"""Deterministic DDIM sampling and DDIM inversion with ReNoise iterations, in k-diffusion sigma space.

Latents are in variance-exploding form, x_sigma = x0 + sigma * eps. ``denoise(x, sigma)`` returns the
denoised prediction x0_hat whatever the model's parameterisation, so eps_hat = (x - x0_hat) / sigma and
a deterministic DDIM step (eta = 0) from s to s' is x' = x0_hat + s' * eps_hat, i.e. Euler on the
probability-flow ODE in sigma.

Rectified-flow models (ComfyUI's CONST sampling: Flux, SD3) need no other step. There x_s = (1 - s) x0 + s n
and ComfyUI's denoise still returns x0_hat = x - s * v_hat (v = n - x0, the predicted velocity), so
eps_hat = (x - x0_hat) / s = v_hat and the same step x' = x + (s' - s) * v_hat is Euler on the flow ODE
dx/ds = v; ReNoise's iterations are then the fixed point of the implicit (backward Euler) flow step.

``denoise`` is always called with ``x`` in the dtype of the input latent and ``sigma`` as a 1-D tensor of
shape [B] (B = x.shape[0], every row the same value; the same layout as ComfyUI's ``sigma * s_in``), on
x's device, in float32 (float64 if x is float64).

For float16 / bfloat16 latents the running latent and all eps arithmetic are kept in float32; they are cast
to x's dtype only for the denoiser call, the callback and the result, so rounding does not accumulate over
steps and iterations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, int, Tensor], None]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(sigma: float | Tensor, ref: Tensor) -> float | Tensor:
    """A float stays a float; a 0-d or [B] tensor is shaped to broadcast over ref's trailing dims."""
    if not isinstance(sigma, Tensor):
        return float(sigma)
    sigma = sigma.to(device=ref.device, dtype=ref.dtype)
    if sigma.ndim == 0:
        return sigma
    if sigma.ndim == 1 and sigma.shape[0] in (1, ref.shape[0]):
        return sigma.reshape(-1, *([1] * (ref.ndim - 1)))
    raise ValueError(
        f"sigma must be a float, a 0-d tensor or a [B] tensor with B = x.shape[0] = {ref.shape[0]}; "
        f"got shape {tuple(sigma.shape)}. Pass one sigma per batch row."
    )


def ddim_step(x: Tensor, x0_hat: Tensor, sigma: float | Tensor, sigma_next: float | Tensor) -> Tensor:
    """One deterministic DDIM step x' = x0_hat + sigma_next * (x - x0_hat) / sigma, in x's dtype.

    ``sigma`` (> 0) and ``sigma_next`` (>= 0) are floats, 0-d tensors or [B] tensors. sigma_next = 0 returns
    x0_hat. Works for either direction (sigma_next > sigma is an explicit inversion step).
    """
    work = _work_dtype(x.dtype)
    xw = x.to(work)
    x0w = x0_hat.to(work)
    eps = (xw - x0w) / _rows(sigma, xw)
    return (x0w + _rows(sigma_next, xw) * eps).to(x.dtype)


def _schedule(sigmas: Sequence[float] | Tensor, ascending: bool) -> list[float]:
    name = "invert" if ascending else "sample"
    if isinstance(sigmas, Tensor):
        values = sigmas.detach().to("cpu", torch.float64)
        if values.ndim != 1:
            raise ValueError(
                f"{name}: sigmas must be 1-D, got shape {tuple(values.shape)}; pass a flat schedule."
            )
        values = values.tolist()
    else:
        values = [float(v) for v in sigmas]
    if len(values) < 2:
        raise ValueError(
            f"{name}: sigmas needs at least 2 values (one step), got {len(values)}: {values}; "
            "pass a schedule with steps + 1 entries."
        )
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name}: sigmas must be finite, got {values}.")
    order = "ascending (low noise -> high noise)" if ascending else "descending (high noise -> low noise)"
    fix = (
        "flip a sampling schedule (e.g. ComfyUI's FlipSigmas) before inverting"
        if ascending
        else "pass the sampling schedule, not the flipped one used for inversion"
    )
    for i in range(len(values) - 1):
        a, b = values[i], values[i + 1]
        if (b <= a) if ascending else (b >= a):
            rel = "<=" if ascending else ">="
            raise ValueError(
                f"{name}: sigmas must be strictly {order}, "
                f"but sigmas[{i + 1}]={b!r} {rel} sigmas[{i}]={a!r}; {fix}."
            )
    if ascending and values[0] <= 0:
        raise ValueError(
            f"invert: sigmas[0] must be > 0 (eps = (x - x0_hat) / sigma), got {values[0]!r}; "
            "floor it to a small positive value such as 1e-4, as ComfyUI's FlipSigmas does."
        )
    if not ascending and values[-1] < 0:
        raise ValueError(
            f"sample: sigmas must be >= 0, got last value {values[-1]!r}; end the schedule at 0 or above."
        )
    return values


def _check_count(name: str, value: object, low: int, high: int | None, fix: str) -> int:
    valid = isinstance(value, int) and not isinstance(value, bool)
    if not valid or value < low or (high is not None and value > high):
        bound = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value!r}; {fix}.")
    return value


def _sigma_rows(s: float, x: Tensor, work: torch.dtype) -> Tensor:
    return torch.full((x.shape[0],), s, dtype=work, device=x.device)


def invert(
    denoise: Denoiser,
    x0: Tensor,
    sigmas: Sequence[float] | Tensor,
    iterations: int = 5,
    average_last: int = 1,
    callback: StepCallback | None = None,
) -> Tensor:
    """DDIM inversion of the clean latent ``x0`` along ascending ``sigmas``, with ReNoise iterations.

    Each step s -> s' costs exactly ``iterations`` denoiser evaluations (ReNoise, Garibi et al. 2024):

    - iteration 1: eps_1 = eps(x, s), x'_1 = x + (s' - s) * eps_1 (plain explicit DDIM inversion);
    - iteration k >= 2: eps_k = eps(x'_{k-1}, s'), x'_k = x + (s' - s) * eps_k, always from the same x.
      This is the fixed-point iteration of the implicit step x' = x + (s' - s) * eps(x', s').

    The returned step is x' = x + (s' - s) * mean(eps_{K-n+1}, ..., eps_K) with K = ``iterations`` and
    n = ``average_last`` (ReNoise's noise averaging; n = 1 keeps the last estimate; averaging adds no
    evaluation). ``iterations=1`` is exactly plain DDIM inversion.

    ``sigmas``: strictly ascending, sigmas[0] > 0, at least 2 entries (a ComfyUI schedule flipped, its
    trailing 0 floored to e.g. 1e-4). ``x0`` is taken to be the latent at sigmas[0]. ``callback(i, n, x)``
    runs after step i (0-based) of n = len(sigmas) - 1 with the new latent; an exception it raises
    propagates and aborts. Returns the latent at sigmas[-1] in x0's dtype.
    """
    values = _schedule(sigmas, ascending=True)
    _check_count("iterations", iterations, 1, None, "use 1 for plain DDIM inversion or 5 as in the paper")
    _check_count(
        "average_last",
        average_last,
        1,
        iterations,
        f"it counts the last eps estimates averaged, so it cannot exceed iterations={iterations!r}; "
        "use 1 for no averaging",
    )
    if not x0.is_floating_point():
        raise ValueError(f"invert: x0 must be a floating-point latent, got dtype {x0.dtype}.")
    dtype, work = x0.dtype, _work_dtype(x0.dtype)
    x = x0.to(work)
    total = len(values) - 1
    for i in range(total):
        s, s_next = values[i], values[i + 1]
        h = s_next - s
        x_est, at = x, s
        kept: list[Tensor] = []
        for k in range(iterations):
            x0_hat = denoise(x_est.to(dtype), _sigma_rows(at, x, work)).to(work)
            eps = (x_est - x0_hat) / at
            if k >= iterations - average_last:
                kept.append(eps)
            x_est, at = x + h * eps, s_next
        if average_last > 1:
            x_est = x + h * (torch.stack(kept).sum(0) / average_last)
        x = x_est
        if callback is not None:
            callback(i, total, x.to(dtype))
    return x.to(dtype)


def sample(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Sequence[float] | Tensor,
    callback: StepCallback | None = None,
) -> Tensor:
    """Plain deterministic DDIM (eta = 0) from ``x`` at sigmas[0] down a strictly descending schedule.

    One denoiser evaluation per step. If the last sigma is 0 the final step returns x0_hat. ``callback`` as
    in :func:`invert`. Returns the latent at sigmas[-1] in x's dtype.
    """
    values = _schedule(sigmas, ascending=False)
    if not x.is_floating_point():
        raise ValueError(f"sample: x must be a floating-point latent, got dtype {x.dtype}.")
    dtype, work = x.dtype, _work_dtype(x.dtype)
    cur = x.to(work)
    total = len(values) - 1
    for i in range(total):
        s, s_next = values[i], values[i + 1]
        x0_hat = denoise(cur.to(dtype), _sigma_rows(s, cur, work)).to(work)
        cur = x0_hat + s_next * ((cur - x0_hat) / s)
        if callback is not None:
            callback(i, total, cur.to(dtype))
    return cur.to(dtype)
