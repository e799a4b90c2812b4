"""Test-only node pack for the server tests (linked into the test server's custom_nodes/ by
tests/comfy_server.py, never shipped): the harness's tiny random models and test images
(HATest_TinyCheckpoint, HATest_Image, HATest_Keep) inside a real `main.py` server."""
import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.append(_TESTS)  # appended: ComfyUI's own modules keep precedence

import harness  # noqa: E402

class _Models(dict):
    def __missing__(self, name):  # built on first use: only the SDXL and DiT workflows' tests need them
        if name == "tiny-sdxl":
            self[name] = (harness.tiny_family_model("SDXL", seed=3), harness.tiny_sdxl_clip(seed=3), _vae)
        elif name == "tiny-flux-fill":
            self[name] = (harness.tiny_flux(seed=12, in_channels=96, guidance_embed=True), _clip,
                          harness.tiny_vae(seed=7, z_channels=16))
        elif name == "tiny-sd3":
            self[name] = (harness.tiny_sd3(seed=13), _clip, harness.tiny_vae(seed=7, z_channels=16))
        elif name in harness.TINY_FAMILIES:
            self[name] = harness.tiny_family(name)
        else:
            raise KeyError(f"no test model {name!r}: use one of tiny, tiny-inpaint, tiny-sdxl, tiny-flux-fill, tiny-sd3, "
                           f"{', '.join(harness.TINY_FAMILIES)}")
        return self[name]


_clip, _vae = harness.tiny_clip(), harness.tiny_vae()
_models = _Models({
    "tiny-inpaint": (harness.tiny_model(in_channels=9, seed=1, transformer_depth=[0, 1],
                                        transformer_depth_output=[0, 0, 1, 1]), _clip, _vae),
    "tiny": (harness.tiny_model(in_channels=4, seed=2), _clip, _vae),
})
harness.register_test_nodes(_models)

import nodes  # noqa: E402

NODE_CLASS_MAPPINGS = {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if k.startswith("HATest_")}
