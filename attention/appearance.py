"""Cross-Image Attention (Alaluf et al. 2023): zero-shot appearance transfer, host-agnostic parts.

One batch holds P (structure, appearance) pairs in three groups of rows:

    rows: [app_0 .. app_P-1, struct_0 .. struct_P-1, out_0 .. out_P-1]

The appearance and structure rows reconstruct their images (plain self-attention); each output row
starts from its structure latent and, in the decoder's self-attention at the two finest resolutions
and inside per-resolution step windows, attends only to its appearance row (eq. 2) or, every k-th
step early on, to its structure row (structure injection, appendix A, eq. 6). `CrossImageSchedule`
says which rule holds at which step; `masked_adain` is eq. 5.

Steps are indices i = 0 .. n-1 of the n denoising steps of the run, compared with the schedule as
fractions i / n, with the official code's half-open windows: start <= i / n < end.
"""
from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .kv import Ref, Refs
from .roles import Layer

Window = tuple[float, float]  # [start, end) as fractions of the schedule

# The paper's schedule (appendix A, 100 DDIM steps): cross-image attention at steps 10-90 in the
# 64x64 decoder layers and 10-70 in the 32x32 ones (512 px), AdaIN at steps 20-100, structure
# injection every 5th step before step 40 (official code).
PAPER_WINDOWS: dict[int, Window] = {1: (0.1, 0.9), 2: (0.1, 0.7)}
PAPER_ADAIN: Window = (0.2, 1.0)


@dataclass(frozen=True)
class AppearanceLayout:
    pairs: int

    def app(self, pair: int) -> int:
        return pair

    def struct(self, pair: int) -> int:
        return self.pairs + pair

    def out(self, pair: int) -> int:
        return 2 * self.pairs + pair

    @property
    def rows(self) -> int:
        return 3 * self.pairs


def check_window(name: str, window: Window) -> None:
    start, end = window
    if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
        raise ValueError(f"{name} is {start}-{end}: both ends are fractions of the schedule, between 0 and 1")
    if start > end:
        raise ValueError(f"{name} starts at {start} after it ends at {end}: swap them (start <= end; "
                         "start == end switches it off)")


@dataclass(frozen=True)
class CrossImageSchedule:
    """When each part of the method acts, over a run of `steps` denoising steps.

    windows: Layer.downscale -> [start, end) of cross-image attention in the decoder at that
    resolution (1: the latent's own resolution, 64x64 tokens at 512 px; 2: 32x32); other resolutions
    and the encoder keep plain self-attention. injection_period k: at steps i with i % k == 0 and
    i / n < injection_until the output rows take the structure's keys/values instead (0: never).
    adain: AdaIN of the output latent to the appearance latent after the steps in this window.
    alpha: appearance guidance scale (eq. 4); alpha_decay: the official code's linear decay from
    alpha at the first step to max(alpha / 2, min(alpha, 1)) at the last.
    """

    steps: int
    windows: Mapping[int, Window] = field(default_factory=lambda: dict(PAPER_WINDOWS))
    injection_period: int = 5
    injection_until: float = 0.4
    adain: Window = PAPER_ADAIN
    alpha: float = 3.5
    alpha_decay: bool = False

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"the schedule has {self.steps!r} steps: it needs at least 1")
        for downscale, window in self.windows.items():
            check_window(f"the cross-image window at downscale {downscale}", window)
        check_window("the AdaIN window", self.adain)
        if self.injection_period < 0:
            raise ValueError(f"injection_period is {self.injection_period}: use 0 (off) or a period in steps")
        if self.alpha < 0:
            raise ValueError(f"alpha is {self.alpha}: the appearance guidance scale must be >= 0")

    def index(self, step: float) -> int:
        """Step index of a schedule position step = i / n (patch.Layer.step)."""
        return min(self.steps - 1, max(0, round(step * self.steps)))

    def _within(self, i: int, window: Window) -> bool:
        return window[0] <= i / self.steps < window[1]

    def cross_at(self, i: int, downscale: int) -> bool:
        window = self.windows.get(downscale)
        return window is not None and self._within(i, window)

    def active(self, i: int) -> bool:
        """Some layer uses cross-image attention at step i (else the model is exactly the plain one)."""
        return any(self._within(i, window) for window in self.windows.values())

    def injects_structure(self, i: int) -> bool:
        return self.injection_period > 0 and i % self.injection_period == 0 and i / self.steps < self.injection_until

    def adain_after(self, i: int) -> bool:
        return self._within(i, self.adain)

    def guidance(self, i: int) -> float:
        if not self.alpha_decay or self.steps == 1:
            return self.alpha
        end = max(self.alpha / 2, min(self.alpha, 1.0))
        return self.alpha + (end - self.alpha) * i / (self.steps - 1)

    def rules(self, layout: AppearanceLayout, layer: Layer) -> list[Refs]:
        rules: list[Refs] = [None] * layout.rows
        if layer.stage != "output" or layer.step is None:
            return rules
        i = self.index(layer.step)
        if not self.cross_at(i, layer.downscale):
            return rules
        inject = self.injects_structure(i)
        for p in range(layout.pairs):
            rules[layout.out(p)] = (Ref(layout.struct(p)),) if inject else (Ref(layout.app(p)),)
        return rules


class CrossImageRules:
    """RowPlan.rules for a schedule. `plain()` switches every rule off for the duration (the
    self-attention pass of the appearance guidance, eq. 4)."""

    def __init__(self, layout: AppearanceLayout, schedule: CrossImageSchedule):
        self.layout, self.schedule = layout, schedule
        self.enabled = True

    def __call__(self, layer: Layer) -> list[Refs]:
        if not self.enabled:
            return [None] * self.layout.rows
        return self.schedule.rules(self.layout, layer)

    @contextmanager
    def plain(self):
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True


def appearance_guidance(eps_self: torch.Tensor, eps_cross: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 4: eps = eps_self + alpha * (eps_cross - eps_self). alpha 0 and 1 return an input as is.

    Linear with weights summing to one, so it holds for denoised predictions as well as for eps."""
    if alpha == 0:
        return eps_self
    if alpha == 1:
        return eps_cross
    return eps_self + alpha * (eps_cross - eps_self)


def _mean_std(x: torch.Tensor, mask: torch.Tensor | None, eps: float):
    """Per-channel mean and sqrt(population variance + eps) of x [C, H, W] over mask [H, W] (bool)."""
    flat = x.flatten(1) if mask is None else x.flatten(1)[:, mask.flatten()]
    mean = flat.mean(dim=1)
    var = flat.var(dim=1, unbiased=False)
    return mean[:, None, None], (var + eps).sqrt()[:, None, None]


def masked_adain(content: torch.Tensor, style: torch.Tensor, content_mask: torch.Tensor | None = None,
                 style_mask: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """Eq. 5, AdaIN of `content` to `style`, each [B, C, H, W] (or [B, C, T, H, W]: per frame too), per row and channel.

    Inside content_mask ([B, H, W], binary; None: everywhere) the content becomes
    (content - mu_c) / sigma_c * sigma_s + mu_s, with mu_c, sigma_c its statistics inside
    content_mask and mu_s, sigma_s the style's inside style_mask (None: the whole style latent);
    outside content_mask it is unchanged. sigma = sqrt(variance + eps) (population variance; the
    official code's unbiased variance differs by a factor (N-1)/N under the root).
    """
    if content.shape[:-2] != style.shape[:-2]:
        raise ValueError(f"AdaIN of a {tuple(content.shape)} latent to a {tuple(style.shape)} one: batch and "
                         "channels must match")
    if content.ndim == 5:  # [B, C, T, H, W]: each frame's channels on their own
        flat = masked_adain(content.flatten(1, 2), style.flatten(1, 2), content_mask, style_mask, eps)
        return flat.view(content.shape)
    out = content.clone()
    for b in range(content.shape[0]):
        cm = None if content_mask is None else content_mask[b].bool()
        sm = None if style_mask is None else style_mask[b].bool()
        if (cm is not None and not cm.any()) or (sm is not None and not sm.any()):
            raise ValueError(f"AdaIN mask of row {b} is empty at the latent's resolution: enlarge the mask or "
                             "leave it unconnected")
        mu_c, sd_c = _mean_std(content[b], cm, eps)
        mu_s, sd_s = _mean_std(style[b], sm, eps)
        styled = (content[b] - mu_c) / sd_c * sd_s + mu_s
        out[b] = styled if cm is None else torch.where(cm, styled, content[b])
    return out
