"""Start ComfyUI in-process (no server) with this pack loaded, and run API-format prompts.

Shared by the test harness and the headless workflow runner.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import sys
import types
import uuid
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]


def as_package() -> None:
    """Expose the pack as the package `harmonizing_attention` (its folder name is not an identifier) without running
    its __init__, which registers with ComfyUI; putting the folder itself on sys.path would let its `nodes/` shadow
    ComfyUI's `nodes.py`. For the tests, benches and scripts that import the pack's modules directly."""
    if "harmonizing_attention" not in sys.modules:
        pkg = types.ModuleType("harmonizing_attention")
        pkg.__path__ = [str(PACK_ROOT)]
        sys.modules["harmonizing_attention"] = pkg


def find_comfyui() -> Path:
    """COMFYUI_PATH, else the ComfyUI install this pack sits in, else ../shared/ComfyUI (CI)."""
    here = Path(os.path.abspath(__file__)).parents[1]  # not resolved: keeps a custom_nodes/ symlink
    candidates = [Path(os.environ["COMFYUI_PATH"])] if os.environ.get("COMFYUI_PATH") else []
    candidates += [here.parent.parent, PACK_ROOT.parent / "shared" / "ComfyUI"]
    for path in candidates:
        if (path / "comfy" / "model_management.py").is_file():
            return path.resolve()
    raise RuntimeError(
        "ComfyUI not found (looked at: " + ", ".join(str(p) for p in candidates) + "). "
        "Run from ComfyUI/custom_nodes/<this pack>, or set COMFYUI_PATH to a ComfyUI checkout."
    )


def configure(cpu: bool) -> Path:
    """Put ComfyUI on sys.path and set its command-line options (the CPU when `cpu`), as its main.py does before
    anything imports comfy.model_management (which picks the device at import). Returns ComfyUI's root."""
    root = find_comfyui()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    sys.dont_write_bytecode = True  # ComfyUI may be a read-only source tree (CI's ../shared)

    from comfy.cli_args import args

    args.cpu = cpu
    args.use_pytorch_cross_attention = True  # ~4x faster than sub-quadratic attention on the CPU
    return root


def start(cpu: bool, custom_nodes: bool = False) -> Path:
    """Initialise ComfyUI once: CLI arguments, import order, built-in nodes, this pack. Returns its root."""
    root = configure(cpu)
    import utils.extra_config  # noqa: F401  (before `import nodes`, else `utils` resolves to comfy/utils.py)
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=custom_nodes, init_api_nodes=False))
    if not any(k.startswith("HA_") for k in nodes.NODE_CLASS_MAPPINGS):
        if not asyncio.run(nodes.load_custom_node(str(PACK_ROOT))):
            raise RuntimeError(f"ComfyUI could not load the pack from {PACK_ROOT}; see the log above")
    return root


class _ServerStub:
    """What PromptExecutor needs of PromptServer: it records the messages it is sent and hands each to `listener`
    when one is set (run_prompt's on_event)."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list = []
        self.listener = None

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))
        if self.listener is not None:
            self.listener(event, data)


class PromptError(RuntimeError):
    def __init__(self, message, details):
        super().__init__(message)
        self.details = details


def new_executor():
    """A PromptExecutor with ComfyUI's classic cache, whichever constructor this ComfyUI has. Reused across
    prompts, it keeps the outputs of nodes whose inputs did not change (loaded models, encoded prompts), as the
    server does."""
    import execution

    params = inspect.signature(execution.PromptExecutor).parameters
    # 0.3.64 takes cache_size; later ComfyUI takes cache_args and reads its RAM headroom (main.py passes 0
    # for the classic cache) even when that cache is not in use
    cache = {"cache_args": {"lru": 0, "ram": 0, "ram_inactive": 0}} if "cache_args" in params else {"cache_size": None}
    return execution.PromptExecutor(_ServerStub(), cache_type=execution.CacheType.CLASSIC, **cache)


async def _cached_outputs(executor, node_id):
    """The output lists of a node run: 0.3.64's cache `get` returns them; later ComfyUI's is async and
    returns CacheEntry(ui, outputs)."""
    cached = executor.caches.outputs.get(node_id)
    if inspect.isawaitable(cached):
        cached = await cached
    return getattr(cached, "outputs", cached)


def run_prompt(prompt: dict, executor=None, outputs: list[str] | None = None, on_event=None) -> dict:
    """Validate and execute an API-format prompt; return {node_id: (output values...)} of every node run.

    executor: one from new_executor() to keep its cache across prompts (default: a fresh one). outputs: the node
    IDs to compute (with what they need) instead of the prompt's output nodes. on_event(event, data): called with
    each message the executor sends a client ("executing" with {"node": id} as each node starts, ...)."""
    return asyncio.run(_run_prompt(json.loads(json.dumps(prompt)), executor, outputs, on_event))


async def _run_prompt(prompt: dict, executor, outputs, on_event=None) -> dict:
    import execution

    prompt_id = str(uuid.uuid4())
    valid = await execution.validate_prompt(prompt_id, prompt, None)
    if not valid[0] or valid[3]:  # the server would run the outputs that passed (a preview) and drop the others
        error = valid[1] or {"message": "Prompt outputs failed validation", "details": ""}
        raise PromptError(f"prompt invalid: {error.get('message')} {valid[3]}",
                          {"error": error, "node_errors": valid[3]})
    executor = executor or new_executor()
    executor.success = True  # a reused executor keeps the last prompt's flag until a node runs
    executor.server.listener = on_event
    extra_data = {} if on_event is None else {"client_id": "headless"}  # the executor messages a client only
    try:
        await executor.execute_async(prompt, prompt_id, extra_data, valid[2] if outputs is None else list(outputs))
    finally:
        executor.server.listener = None
    if not executor.success:
        errors = [data for event, data in executor.status_messages if event == "execution_error"]
        err = errors[0] if errors else {"exception_message": "interrupted", "node_type": None}
        raise PromptError(f"{err.get('node_type')}: {err.get('exception_message')}", err)
    results = {}
    for node_id in prompt:
        cached = await _cached_outputs(executor, node_id)
        if cached is not None:  # one list per output socket, holding the value
            results[node_id] = tuple(values[0] if len(values) == 1 else values for values in cached)
    logging.debug("ran %d nodes", len(results))
    return results
