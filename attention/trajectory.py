"""Keys/values of reference rows recorded in one sampling pass and replayed in another.

Geometry-preserving generation (eq. 5) lets each output row attend to its source's tokens inside the source
mask, at every self-attention layer and step. The source rows themselves attend only to themselves, so
they can be sampled first as a batch of their own, recording those keys/values; the output rows are then
sampled with the recorded keys/values as reference-only rows (kv.Program's ref_k / ref_v). The source pass
depends on neither the placement nor the colour shift, so a re-run can replay a stored recording.

A recording holds, per model call and cond/uncond chunk (its key: the chunk's sigma and cond/uncond flag), every
attention layer's keys and values of the source rows at their region tokens only ([S, longest region, C], row s
valid up to its region length), on a storage device (the host's intermediate device: the CPU). The host records
a whole call at once and hands a replayed call's layers over before the call starts (nodes/patch.py's model
wrapper), so the layers themselves only gather and read tensors: nothing here runs inside a compiled model.
Calls with one key are kept in order: the n-th replayed call with a key gets the n-th recorded one.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Mapping

import torch

# layer -> (k, v [S, longest region, C], region length of each of the S rows)
Layers = Mapping[Hashable, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]]


class Trajectory:
    def __init__(self, storage: torch.device | str = "cpu"):
        self.storage = torch.device(storage)
        self._calls: dict[Hashable, list[dict]] = defaultdict(list)
        self.nbytes = 0

    def record(self, key: Hashable, layers: Layers) -> None:
        """Every layer of one model call (one cond/uncond chunk), moved to the storage device."""
        kept = {}
        for layer, (k, v, lengths) in layers.items():
            k, v = k.to(self.storage), v.to(self.storage)
            self.nbytes += k.numel() * k.element_size() + v.numel() * v.element_size()
            kept[layer] = (k, v, tuple(lengths))
        self._calls[key].append(kept)

    def replayer(self) -> Replayer:
        return Replayer(self)


class Replayer:
    """One replay pass over a recording: the n-th call with a key gets the n-th recorded call of that key."""

    def __init__(self, trajectory: Trajectory):
        self.trajectory = trajectory
        self._next: dict[Hashable, int] = defaultdict(int)

    def next(self, key: Hashable) -> Layers:
        """The recorded layers of the next call with `key` (on the storage device)."""
        calls = self.trajectory._calls.get(key, [])
        n = self._next[key]
        if n >= len(calls):
            raise RuntimeError(
                f"no recorded source keys/values for the model call {key} (call {n + 1}, {len(calls)} recorded): "
                "the output pass sampled differently from the source pass. Use the same MODEL and settings for both."
            )
        self._next[key] = n + 1
        return calls[n]
