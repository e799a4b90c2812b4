"""Test set-up (ComfyUI start-up is added by the harness)."""
import sys
import types
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]

# The pack's folder name is not a Python identifier, and its `nodes/` would shadow ComfyUI's
# `nodes.py` if the folder were put on sys.path. Expose it as the package `harmonizing_attention`
# instead, without running its __init__ (which registers with ComfyUI).
if "harmonizing_attention" not in sys.modules:
    _pkg = types.ModuleType("harmonizing_attention")
    _pkg.__path__ = [str(PACK_ROOT)]
    sys.modules["harmonizing_attention"] = _pkg


import pytest  # noqa: E402

from harness import start  # noqa: E402  (tests/ is on sys.path: pytest's rootdir-relative import)


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI started in-process with the pack loaded. Tests import comfy modules after requesting it."""
    return start()


@pytest.fixture(scope="session")
def tiny(comfy):
    """Tiny random models by name, also reachable from graphs through HATest_TinyCheckpoint."""
    import harness

    clip, vae = harness.tiny_clip(), harness.tiny_vae()
    models = {
        # attention in the 32x32 encoder / middle and the 64x64 decoder only: fast at 512 px
        "tiny-inpaint": (harness.tiny_model(in_channels=9, seed=1, transformer_depth=[0, 1],
                                            transformer_depth_output=[0, 0, 1, 1]), clip, vae),
        "tiny": (harness.tiny_model(in_channels=4, seed=2), clip, vae),
    }
    harness.register_test_nodes(models)
    return models
