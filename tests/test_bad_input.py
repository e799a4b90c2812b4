"""Bad input across every node, through ComfyUI's executor: each case ends in ComfyUI's normal error report
(a validation error or an execution_error from the node) whose message names the values and the fix, or,
where the input is odd but meaningful, in a clean run. Nothing is written outside ComfyUI's folders.

(test_pipeline.py holds further cases: empty mask, shift off the canvas, mask/image size mismatch,
steps 0, renoise_average > iterations, sizes not multiple of 8, prebuilt inpainting conditioning,
unblended inversion, model mismatch; test_app_server.py the same through the HTTP server.)
"""
import json
from pathlib import Path

import harness
import pytest
import torch
from test_pipeline import graph

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def bad_nodes(tiny):
    """HATest_BadImage / HATest_BadMask: images and masks no well-behaved node produces, and an 8-channel UNet."""
    from comfy_api.latest import io

    import nodes

    class BadImage(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="HATest_BadImage", category="_for_testing",
                             inputs=[io.String.Input("kind"), io.Int.Input("size"), io.Int.Input("batch")],
                             outputs=[io.Image.Output()])

        @classmethod
        def execute(cls, kind, size, batch):
            img = harness.make_image("checker", size, size).repeat(batch, 1, 1, 1)
            if kind == "nan":
                img[:, 3, 3] = float("nan")
            elif kind == "inf":
                img[:, 0, 0, 1] = float("inf")
            elif kind == "rgba":
                img = torch.cat([img, torch.ones_like(img[..., :1])], -1)
            elif kind == "gray":
                img = img[..., :1]
            elif kind == "noise":
                img = harness.make_image("noise:3", size, size).repeat(batch, 1, 1, 1)
            return io.NodeOutput(img)

    class BadMask(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="HATest_BadMask", category="_for_testing",
                             inputs=[io.String.Input("kind"), io.Int.Input("size"), io.Int.Input("batch")],
                             outputs=[io.Mask.Output()])

        @classmethod
        def execute(cls, kind, size, batch):
            m = torch.zeros(batch, size, size)
            m[:, size // 4: size // 2, size // 4: size // 2] = 1.0
            if kind == "full":
                m = torch.ones(batch, size, size)
            elif kind == "noise":
                m = torch.rand(batch, size, size, generator=torch.Generator().manual_seed(0))
            elif kind == "nan":
                m[:, 1, 1] = float("nan")
            elif kind == "out_of_range":
                m = m * 7.0 - 3.0
            elif kind == "corner":
                m = torch.zeros(batch, size, size)
                m[:, :4, :4] = 1.0
            elif kind == "empty":  # Load Image's MASK of an image without alpha: an empty 64x64 mask
                m = torch.zeros(batch, 64, 64)
            elif kind == "pixel":
                m = torch.zeros(batch, size, size)
                m[:, 20, 20] = 1.0
            return io.NodeOutput(m)

    for cls in (BadImage, BadMask):
        nodes.NODE_CLASS_MAPPINGS[cls.GET_SCHEMA().node_id] = cls
    _, clip, vae = tiny["tiny"]
    tiny["tiny-8ch"] = (harness.tiny_model(in_channels=8, seed=4), clip, vae)
    tiny["tiny-pixart-bad"] = (harness.tiny_pixart(seed=6), clip, vae)  # a family the pack cannot patch
    return True


def image(prompt, node_id, kind, size=64, batch=1):
    prompt[node_id] = {"class_type": "HATest_BadImage", "inputs": {"kind": kind, "size": size, "batch": batch}}


def mask(prompt, kind, size=64, batch=1):
    prompt["15"] = {"class_type": "HATest_BadMask", "inputs": {"kind": kind, "size": size, "batch": batch}}


def widget(node_id, **values):
    return lambda p: p[node_id]["inputs"].update(values)


def both(*fns):
    def apply(p):
        for fn in fns:
            fn(p)
    return apply


# (id, change to the graph, expected: list of substrings of the error report (a tuple: any one of them), or "ok"
# for a clean run)
CASES = [
    # --- HA_GeometryImageEdit: images and masks
    ("source_nan", lambda p: image(p, "3", "nan"), ["source contains NaN", "fix the node that produced it"]),
    ("target_inf", lambda p: image(p, "5", "inf"), ["target contains NaN or infinite", "fix the node"]),
    ("mask_nan", lambda p: mask(p, "nan"), ["source_mask contains NaN", "fix the node"]),
    ("source_one_channel", lambda p: image(p, "3", "gray"),
     ["source has shape (1, 64, 64, 1)", "[batch, height, width, 3]"]),
    ("mask_full", lambda p: mask(p, "full"),
     ["source mask covers the whole 64x64", "leave some of the image unmasked"]),
    ("mask_noise", lambda p: mask(p, "noise"), "ok"),
    ("mask_values_out_of_range", lambda p: mask(p, "out_of_range"), "ok"),
    ("source_rgba", lambda p: image(p, "3", "rgba"), "ok"),
    ("mask_wrong_size", lambda p: mask(p, "box", size=32),
     ["source_mask is 32x32", "source is 64x64", "resize the mask"]),
    ("mask_of_a_photo_without_alpha", both(lambda p: mask(p, "empty"), lambda p: image(p, "3", "noise", size=96)),
     ["source_mask is an empty 64x64 mask but source is 96x96", "no painted mask", "Open in MaskEditor"]),
    ("mask_batch_3_source_batch_2", both(lambda p: mask(p, "box", batch=3), lambda p: image(p, "3", "noise", batch=2)),
     ["source_mask has a batch of 3 but source has 2", "the same count"]),
    ("source_batch_2_target_batch_3", both(lambda p: image(p, "3", "noise", batch=2),
                                           lambda p: image(p, "5", "noise", batch=3),
                                           lambda p: mask(p, "box", batch=2)),
     ["source has a batch of 2 but target has 3"]),
    ("shift_up_off_canvas", widget("6", shift_y=-5000.0), ["-5000", "canvas"]),
    ("corner_shifted_off_canvas", both(lambda p: mask(p, "corner"), widget("6", rotation=45.0, shift_x=-40.0)),
     ["falls entirely outside the target canvas", "(-38.5, 1.5)", "set shift_x to -1.5"]),
    ("corner_rotated_half_off", both(lambda p: mask(p, "corner"), widget("6", rotation=45.0, shift_x=-2.0)), "ok"),
    ("one_pixel_mask_scaled_down", both(lambda p: mask(p, "pixel"), widget("6", scale=0.05)), "ok"),
    ("scaled_over_the_whole_canvas", widget("6", scale=8.0), ["geometry mask covers the whole 64x64", "unmasked"]),
    ("source_and_target_sizes_differ", both(lambda p: image(p, "5", "noise", size=96)), "ok"),
    ("image_too_small", both(lambda p: image(p, "3", "noise", size=8), lambda p: image(p, "5", "noise", size=8),
                             lambda p: mask(p, "full", size=8)), ["8x8"]),
    # --- widget values through the API, refused at validation by ComfyUI's own checks
    # (V3 combos reach the node unchecked in ComfyUI 0.3.64, so the nodes check their own options; later ComfyUI
    # refuses them first, as "Value not in list")
    ("color_mode_garbage", widget("7", mode="sharpen"),
     [("colour mode 'sharpen': choose one of", "mode: 'sharpen' not in"), "mean_shift"]),
    ("color_strength_too_big", widget("7", strength=5.0), ["bigger than max", "strength"]),
    ("ring_width_zero", widget("7", ring_width=0), ["smaller than min", "ring_width"]),
    ("steps_huge", widget("8", steps=100000), ["Value 100000 bigger than max of 1000", "steps"]),
    ("steps_not_a_number", widget("8", steps="twenty"), ["steps", "twenty"]),
    ("renoise_iterations_zero", widget("8", renoise_iterations=0), ["renoise_iterations is 0", "1 to 50"]),
    ("inversion_attention_garbage", widget("8", attention="cross"),
     [("mode 'cross': choose one of", "attention: 'cross' not in"), "texture_aligning"]),
    ("feather_huge", widget("9", feather=1000.0), ["bigger than max", "feather"]),
    ("cfg_negative", widget("10", cfg=-1.0), ["smaller than min", "cfg"]),
    ("sampler_attention_garbage", widget("10", attention=3),
     [("mode 3: choose one of", "attention: 3 not in"), "geometry_preserving"]),
    # --- wrong connections and models
    ("image_into_scene_socket", lambda p: p["9"]["inputs"].update(inverted=["5", 0]),
     ["Return type mismatch", "inverted"]),
    ("clip_into_model_socket", lambda p: p["8"]["inputs"].update(model=["1", 1]), ["Return type mismatch", "model"]),
    ("missing_scene", lambda p: p["7"]["inputs"].pop("scene"), ["Required input is missing", "scene"]),
    ("pixart_model", lambda p: p["1"]["inputs"].update(ckpt_name="tiny-pixart-bad"),
     ["not a UNet", "SD1.x / SD2.x / SDXL"]),
    ("eight_channel_unet", lambda p: p["1"]["inputs"].update(ckpt_name="tiny-8ch"), ["8 input channels", "inpainting"]),
    # --- odd but meaningful: runs cleanly
    ("one_step", widget("8", steps=1), "ok"),
    ("cfg_high", widget("10", cfg=30.0), "ok"),
    ("feather_max_on_small_latent", widget("9", feather=16.0), "ok"),
]


@pytest.mark.parametrize("change, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(bad_nodes, tiny, change, expected, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.chdir(tmp_path)  # a node writing to a relative path would land here
    roots = {name: Path(getattr(folder_paths, f"get_{name}_directory")())
             for name in ("output", "temp", "input", "user")}
    before = {p for root in roots.values() for p in root.rglob("*")}
    prompt = graph(steps=2, renoise_iterations=1)
    change(prompt)
    if expected == "ok":
        out = harness.run_prompt(prompt)
        assert torch.isfinite(out["11"][0]).all()
    else:
        with pytest.raises(harness.PromptError) as err:
            harness.run_prompt(prompt)
        report = str(err.value) + " " + json.dumps(err.value.details, default=str)
        for text in expected:
            assert any(t in report for t in (text if isinstance(text, tuple) else (text,))), \
                f"{text!r} not in the report: {report[:1500]}"
        assert "Traceback" not in str(err.value)
    assert list(tmp_path.iterdir()) == []
    new = {p for root in roots.values() for p in root.rglob("*")} - before
    assert all(roots["output"] in p.parents or roots["temp"] in p.parents for p in new), new


# ---------------------------------------------------------------- NaN and infinite numbers, before anything runs

def _float_widgets(class_type: str) -> dict:
    import nodes

    types = nodes.NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    return {name: spec[1] for group in ("required", "optional") for name, spec in types.get(group, {}).items()
            if spec[0] == "FLOAT"}


@pytest.fixture
def progress_events():
    """Every ComfyUI ProgressBar update (node work: the inversion's and the samplers' steps) while the test runs."""
    import comfy.utils

    events = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: events.append((value, total)))
    yield events
    comfy.utils.set_progress_bar_global_hook(None)


def test_nan_balance_weight_on_the_sampler_is_refused_before_the_inversion(tiny, progress_events):
    prompt = graph(steps=2, renoise_iterations=1)
    prompt["10"]["inputs"].update(balance="manual", balance_weight=float("nan"))
    with pytest.raises(harness.PromptError) as err:
        harness.run_prompt(prompt)
    [error, *_] = err.value.details["node_errors"]["10"]["errors"]
    assert "(HA_GeometryPreservingSampler): balance_weight is NaN (not a number): set it to a number from 0.01 to " \
           "100 (default 1)" in error["details"]
    assert progress_events == []  # refused at validation: the inversion never ran
    prompt["10"]["inputs"]["balance_weight"] = 2.0  # the control: a number runs, and its steps are seen
    harness.run_prompt(prompt)
    assert (2, 2) in progress_events


def test_every_float_widget_of_every_node_refuses_nan_and_infinity(tiny, progress_events):
    """Each FLOAT widget of each pack node in the shipped workflows, set to NaN, +inf and -inf through the API (and
    "nan" as a string, as `--set X=nan` sends it): refused by ComfyUI's validation, naming the node, the input, the
    value and the fix, only that node reported, nothing run. Every pack node with a FLOAT widget is covered."""
    import nodes
    from test_pipeline import shipped

    covered = set()
    for name, ckpt in (("geometry_transfer", "tiny-inpaint"), ("multi_geometry_transfer", "tiny-inpaint"),
                       ("appearance_transfer", "tiny")):
        prompt = shipped(f"api/{name}.json", ckpt=ckpt)
        for node_id, node in prompt.items():
            if not node["class_type"].startswith("HA_"):
                continue
            display = nodes.NODE_DISPLAY_NAME_MAPPINGS.get(node["class_type"], node["class_type"])
            for widget in _float_widgets(node["class_type"]):
                for value, shown in ((float("nan"), "is NaN"), (float("inf"), "is inf"), (float("-inf"), "is -inf"),
                                     ("nan", "is NaN")):
                    bad = json.loads(json.dumps(prompt))
                    bad[node_id]["inputs"][widget] = value
                    with pytest.raises(harness.PromptError) as err:
                        harness.run_prompt(bad)
                    refused = err.value.details["node_errors"]
                    assert list(refused) == [node_id], (name, node_id, widget, refused)
                    message = refused[node_id]["errors"][0]["details"]
                    assert f"{display} ({node['class_type']}): {widget} {shown}" in message, message
                    assert "set it to a number from" in message, message
                covered.add(node["class_type"])
    assert progress_events == []
    with_floats = {k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith("HA_") and _float_widgets(k)}
    assert covered == with_floats
