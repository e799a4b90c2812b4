"""Keys/values of reference rows recorded in one sampling pass and replayed in another.

Geometry-preserving generation (eq. 5) lets each output row attend to its source's tokens inside the source
mask, at every self-attention layer and step. The source rows themselves attend only to themselves, so
they can be sampled first as a batch of their own, recording those keys/values; the output rows are then
sampled with the recorded keys/values appended to their batch as reference-only rows. The source pass
depends on neither the placement nor the colour shift, so a re-run can replay a stored recording.

A recording holds, per layer call, each source row's keys and values at its region tokens only
([S, longest region, C] plus the region lengths), on a storage device (the host's intermediate device:
the CPU), in the order the calls came for each (layer, sigma, cond/uncond) key.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence

import torch


class Trajectory:
    def __init__(self, storage: torch.device | str = "cpu"):
        self.storage = torch.device(storage)
        self._calls: dict[Hashable, list[tuple[torch.Tensor, torch.Tensor, list[int]]]] = defaultdict(list)
        self.nbytes = 0

    def record(self, key: Hashable, k: torch.Tensor, v: torch.Tensor, tokens: Sequence[torch.Tensor]) -> None:
        """k, v: [S, N, C] of the source rows at one layer call; tokens[s]: row s's region token indices."""
        lengths = [int(t.numel()) for t in tokens]
        longest = max(lengths, default=0)
        kept = []
        for t in (k, v):
            out = t.new_zeros((t.shape[0], longest) + tuple(t.shape[2:]))
            for s, index in enumerate(tokens):
                out[s, : lengths[s]] = t[s, index]
            kept.append(out.to(self.storage))
            self.nbytes += out.numel() * out.element_size()
        self._calls[key].append((kept[0], kept[1], lengths))

    def replayer(self) -> Replayer:
        return Replayer(self)


class Replayer:
    """One replay pass over a recording: the n-th call with a key gets the n-th recorded call of that key."""

    def __init__(self, trajectory: Trajectory):
        self.trajectory = trajectory
        self._next: dict[Hashable, int] = defaultdict(int)

    def rows(self, key: Hashable, tokens: int, device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(k, v [S, tokens, C], region lengths): row s holds its region's keys/values first, zeros after."""
        calls = self.trajectory._calls.get(key, [])
        n = self._next[key]
        if n >= len(calls):
            raise RuntimeError(
                f"no recorded source keys/values for self-attention call {key} (call {n + 1}, {len(calls)} recorded): "
                "the output pass sampled differently from the source pass. Use the same MODEL and settings for both."
            )
        self._next[key] = n + 1
        k, v, lengths = calls[n]
        padded = []
        for t in (k, v):
            out = t.new_zeros((t.shape[0], tokens) + tuple(t.shape[2:]), device=device)
            out[:, : t.shape[1]] = t.to(device)
            padded.append(out)
        return padded[0], padded[1], lengths
