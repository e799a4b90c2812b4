"""Work that a re-run can take from the previous run: a bounded in-memory cache, and its keys.

An artist moves the geometry and runs again. The source rows of a geometry transfer do not depend on
the placement or the colour shift: they attend only to themselves and their inpainting inputs are their
own masked images. The pipeline computes them as a batch of their own (so their values do not depend on
what else is in the batch) and keeps them here; a re-run whose source inputs are unchanged takes them
instead of recomputing, bit for bit the values a fresh run computes.

Keys cover everything a value depends on. Objects (the MODEL's ModelPatcher with its weight patches and
model options, the VAE, anything in the conditioning that is not a tensor or a plain value) count by
identity: ComfyUI's nodes clone before they change a model, so an object is never changed in place once a
node returned it; the patcher's patches_uuid (new at every weight-patch change) is part of the key too.
Tensors (images, masks, conditioning, the sigma schedule) count by content. A value that cannot be keyed
(an object without weak references) is not cached.

Memory: entries live on ComfyUI's intermediate device (the CPU) and are evicted oldest first (least
recently used) above `budget` bytes (HARMONIZING_ATTENTION_CACHE_MB, default 1024; 0 disables the cache).
An entry is freed as soon as any object in its key is garbage collected: the app's "free model and node
cache" drops ComfyUI's node outputs, so the MODEL and VAE objects and our entries with them. Entries of a
model that ComfyUI has unloaded (unload_all_models, or a full unload by free_memory to make room; a partial
offload keeps it loaded) are freed at the next consultation of the cache (ComfyUI offers no unload
callback on the MODEL a node receives, and clones' callbacks are gone once the clone is: LoadedModel then
holds the parent).
"""
from __future__ import annotations

import hashlib
import itertools
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Optional

import torch

import comfy.model_management


class Unkeyable(Exception):
    """A value the key would depend on cannot be identified: do not cache."""


class Cache:
    """Key -> tuple of tensors, least recently used evicted first above `budget` bytes."""

    def __init__(self, budget: int):
        self.budget = budget
        self._entries: OrderedDict[tuple, tuple[Any, int, frozenset]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = self.peak_bytes = 0
        self.hits = self.misses = 0

    def __len__(self):
        return len(self._entries)

    def get(self, key: tuple):
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: tuple, value, owners: frozenset) -> None:
        """Store `value` (see nbytes); `owners`: the identity tokens in the key."""
        size = nbytes(value)
        with self._lock:
            if size > self.budget:
                return
            self._pop(key)
            self._entries[key] = (value, size, owners)
            self.bytes += size
            while self.bytes > self.budget:
                self._pop(next(iter(self._entries)))
            self.peak_bytes = max(self.peak_bytes, self.bytes)

    def drop_owner(self, token: int) -> None:
        """Free every entry whose key holds `token` (the object it stands for died or was unloaded)."""
        with self._lock:
            for key in [k for k, (_, _, owners) in self._entries.items() if token in owners]:
                self._pop(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def _pop(self, key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[1]


def nbytes(value) -> int:
    """Bytes held by tensors, tuples/lists of values and objects with an `nbytes` (a Trajectory)."""
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    return int(getattr(value, "nbytes", 0))


CACHE = Cache(int(float(os.environ.get("HARMONIZING_ATTENTION_CACHE_MB", "1024")) * 2 ** 20))

_tokens: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
_counter = itertools.count(1)
_models: dict[int, weakref.ref] = {}  # token of a ModelPatcher in a key -> its BaseModel (the loaded weights)


def identity(obj) -> int:
    """A token for a live object, never reused; when the object dies, entries keyed with it are freed."""
    try:
        token = _tokens.get(obj)
        if token is None:
            token = _tokens[obj] = next(_counter)
            weakref.finalize(obj, CACHE.drop_owner, token)
        return token
    except TypeError as e:  # not weak-referenceable or not hashable
        raise Unkeyable(type(obj).__name__) from e


class Key:
    """Builds a key: parts appended in order, identity tokens collected as the entry's owners."""

    def __init__(self, kind: str):
        self.parts: list = [kind]
        self.owners: set[int] = set()
        self.models: dict[int, weakref.ref] = {}  # token of a ModelPatcher -> its BaseModel

    def obj(self, obj) -> Key:
        token = identity(obj)
        self.owners.add(token)
        self.parts.append(("obj", token))
        return self

    def value(self, value) -> Key:
        """Tensors by content (dtype, shape, bytes), containers recursively, other objects by identity."""
        self.parts.append(self._digest(value))
        return self

    def model(self, patcher) -> Key:
        """A ModelPatcher: the object (its patches and options are fixed once a node returned it), its weight
        patches' uuid, the weights' dtype and the devices it computes on."""
        inner = patcher.model
        self.obj(patcher)
        self.models[identity(patcher)] = weakref.ref(inner)
        self.parts.append(("model", str(patcher.patches_uuid), str(inner.get_dtype()),
                           str(getattr(inner, "manual_cast_dtype", None)), str(patcher.load_device)))
        return self

    def vae(self, vae) -> Key:
        self.obj(vae)
        self.parts.append(("vae", str(getattr(vae, "vae_dtype", None)), str(getattr(vae, "device", None))))
        return self

    def build(self) -> tuple[tuple, frozenset]:
        return tuple(self.parts), frozenset(self.owners)

    def _digest(self, value):
        if value is None or isinstance(value, (bool, int, float, str)):
            return (type(value).__name__, value)
        if isinstance(value, torch.Tensor):
            data = value.detach().to("cpu").contiguous()
            h = hashlib.blake2b(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"",
                                digest_size=16)
            return ("tensor", str(data.dtype), tuple(data.shape), h.hexdigest())
        if isinstance(value, (list, tuple)):
            return (type(value).__name__, tuple(self._digest(v) for v in value))
        if isinstance(value, dict):
            return ("dict", tuple((str(k), self._digest(value[k])) for k in sorted(value, key=str)))
        token = identity(value)
        self.owners.add(token)
        return ("obj", token)


def cached(key: Optional[Key], compute: Callable[[], Any]):
    """compute(), or the value stored under `key` by an earlier call; key None: always compute."""
    if key is None or CACHE.budget <= 0:
        return compute()
    release_unloaded()
    k, owners = key.build()
    value = CACHE.get(k)
    if value is None:
        value = compute()
        CACHE.put(k, value, owners)
        _models.update(key.models)
    return value


def key(kind: str, build: Callable[[Key], Any]) -> Optional[Key]:
    """A Key filled by `build`, or None when something in it cannot be keyed."""
    k = Key(kind)
    try:
        build(k)
    except Unkeyable:
        return None
    return k


def release_unloaded() -> None:
    """Free the entries of every model ComfyUI no longer holds loaded (unload_all_models, free_memory)."""
    loaded = {id(p.model) for p in comfy.model_management.loaded_models() if p is not None}
    for token, model in list(_models.items()):
        if model() is None or id(model()) not in loaded:
            del _models[token]
            CACHE.drop_owner(token)
