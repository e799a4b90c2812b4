"""Test set-up (ComfyUI start-up is added by the harness)."""
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PACK_ROOT / "scripts"))  # comfy_runtime, run_workflow, workflow_format
import comfy_runtime  # noqa: E402

comfy_runtime.as_package()  # the pack as `harmonizing_attention`, without its ComfyUI registration

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


# ---------------------------------------------------------------- a real ComfyUI server (tests/comfy_server.py)

@pytest.fixture(scope="session")
def app_server(comfy, tmp_path_factory):
    """`python main.py --cpu` with this pack, the test node pack and tiny checkpoints under the shipped
    workflows' checkpoint names; its folders live in a temporary base directory."""
    import comfy_server

    server = comfy_server.ComfyServer(comfy["root"], base=tmp_path_factory.mktemp("ha-server"),
                                      checkpoints=comfy_server.shipped_checkpoints())
    server.start()
    # the isolation test's reference: a plain KSampler graph on the fresh server, before any pack node ran
    from test_app_server import plain_ksampler, saved_latent

    server.reference = saved_latent(server, server.run(plain_ksampler("ha_isolation/fresh")), "5")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def families(tiny):
    """Tiny SDXL (depths 2 and 10 like the real one), SDXL inpainting (9 channels, depth 1), SD2.x v-prediction and a
    tiny PixArt (a family the pack refuses), each (MODEL, CLIP, VAE). They are added to `tiny`'s names, so
    graphs reach them through HATest_TinyCheckpoint too."""
    import harness

    sdxl_clip = harness.tiny_sdxl_clip(seed=3)
    _, clip, vae = tiny["tiny"]
    models = {
        "tiny-sdxl": (harness.tiny_family_model("SDXL", seed=3), sdxl_clip, vae),
        # one transformer block per level: the inpainting variant's tests run whole graphs
        "tiny-sdxl-inpaint": (harness.tiny_family_model(
            "SDXL", in_channels=9, seed=4, transformer_depth=[0, 0, 1, 1, 1, 1],
            transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1], transformer_depth_middle=1), sdxl_clip, vae),
        "tiny-sd2v": (harness.tiny_family_model("SD20", seed=5, v_prediction=True), clip, vae),
        "tiny-pixart": (harness.tiny_pixart(seed=6), clip, vae),
    }
    tiny.update(models)  # the dict HATest_TinyCheckpoint reads
    return models


@pytest.fixture(scope="module")
def single_thread():
    """Torch on one intra-op thread for the module: the tiny models' ops are far below the size where threads
    pay, and on a loaded CPU each op's thread barrier costs ~10 ms (a tiny graph: 6-10 s on 2 threads with
    other work running, 0.15 s on 1)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
