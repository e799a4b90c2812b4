"""Real photos: source and target of any sizes, the method on a working region around the geometry at the model's
size, stitched back into the full-resolution target (attention/window.py; HA_GeometryImageEdit's working_size and
context, HA_DetailPreservingComposite's scene)."""
import math

import pytest
import torch

import harness
from harmonizing_attention.attention import composite, edit, tokens
from harmonizing_attention.attention import window as wr

WORKING = 128  # the graphs' working size: a small canvas keeps the tiny model fast


# ---------------------------------------------------------------- the window arithmetic

def test_off_is_the_whole_target_and_a_same_size_source_is_untouched():
    win = wr.layout((10, 20, 30, 40), [(12, 22, 20, 30)], (64, 96), (64, 96))
    assert win.box == (0, 0, 96, 64) and win.canvas_hw == (64, 96) and win.source_origins == ((0, 0),)
    assert not win.resampled and win.factor == 1
    # another source size: a target-sized window of it around its mask, moved inside it where it fits
    small = wr.layout((10, 20, 30, 40), [(40, 30, 60, 50)], (64, 96), (80, 70))
    assert small.source_origins == ((0, 8),)  # narrower than the window: all of it; taller: its mask's part
    big = wr.layout((10, 20, 30, 40), [(300, 10, 320, 30)], (64, 96), (200, 400))
    assert big.source_origins == ((310 - 48, 0),)  # centred on the mask, inside the source


@pytest.mark.parametrize("seed", range(40))
def test_on_holds_the_geometry_and_every_source_mask_at_the_working_size(seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    ht, wt, hs, ws = r(64, 4000), r(64, 4000), r(64, 4000), r(64, 4000)
    def box(h, w):
        x0, y0 = r(0, w - 1), r(0, h - 1)
        return x0, y0, r(x0 + 1, w + 1), r(y0 + 1, h + 1)
    geo, sources = box(ht, wt), [box(hs, ws) for _ in range(r(1, 4))]
    size = (512, 768, 1024)[seed % 3]
    win = wr.layout(geo, sources, (ht, wt), (hs, ws), size, 0.5)
    (bh, bw), (ch, cw) = win.size_hw, win.canvas_hw
    x0, y0, x1, y1 = win.box
    assert ch % wr.CANVAS_MULTIPLE == 0 and cw % wr.CANVAS_MULTIPLE == 0
    assert x0 <= geo[0] and y0 <= geo[1] and x1 >= geo[2] and y1 >= geo[3]  # the geometry is in the window
    sw, sh = max(b[2] - b[0] for b in sources), max(b[3] - b[1] for b in sources)
    assert (bw <= max(wt, sw) and bh <= max(ht, sh))  # within the target unless a source mask needs more
    if bw <= wt:
        assert 0 <= x0 and x1 <= wt
    for (ox, oy), b in zip(win.source_origins, sources, strict=True):  # each source mask in its own window
        assert ox <= b[0] and oy <= b[1] and ox + bw >= b[2] and oy + bh >= b[3]
    f = win.factor
    assert f <= wr.MAX_UPSCALE + 0.1
    if not win.upscale_limited:  # about working_size^2 canvas pixels
        assert abs(math.sqrt(ch * cw) / size - 1) < 0.1
    else:
        assert bw * bh < (size / wr.MAX_UPSCALE) ** 2 * 1.01
    # the two axes are resampled alike, up to the canvas's rounding
    assert abs((ch / bh) / (cw / bw) - 1) < 2 * wr.CANVAS_MULTIPLE / min(ch, cw)


def test_a_small_geometry_gets_context_not_an_unbounded_upscale():
    win = wr.layout((1000, 700, 1060, 703), [(500, 380, 560, 383)], (1500, 2000), (768, 1024), 512)
    assert win.factor == pytest.approx(wr.MAX_UPSCALE, rel=0.05) and not win.upscale_limited
    assert win.size_hw[0] * win.size_hw[1] >= 256 * 256
    tiny = wr.layout((10, 10, 20, 20), [(10, 10, 20, 20)], (64, 64), (64, 64), 512)
    assert tiny.upscale_limited and tiny.box == (0, 0, 64, 64) and tiny.canvas_hw == (128, 128)


# ---------------------------------------------------------------- crop, resample, stitch

def test_crop_repeats_the_border_for_images_and_zeroes_masks():
    image = torch.arange(12.0).reshape(1, 3, 4, 1)
    out = wr.crop(image, [(-1, 1)], (3, 3))
    assert out[0, :, :, 0].tolist() == [[4, 4, 5], [8, 8, 9], [8, 8, 9]]
    mask = wr.crop(torch.ones(1, 3, 4), [(-1, 1)], (3, 3), mask=True)
    assert mask[0].tolist() == [[0, 1, 1], [0, 1, 1], [0, 0, 0]]
    assert wr.crop(image, [(0, 0)], (3, 4)) is image and wr.pad(image, 1) is image
    assert wr.pad(torch.ones(1, 5, 6), 8, mask=True).shape == (1, 8, 8)


def test_a_crack_shrunk_by_the_working_region_stays_one_unbroken_chain():
    mask = torch.zeros(1, 600, 800)
    for x in range(100, 700):  # a 2 px crack, a gentle slope
        y = 300 + int(0.2 * (x - 100))
        mask[0, y:y + 2, x] = 1
    small = wr.resample_mask(mask, (150, 200))  # 0.25x: half a pixel wide
    from scipy import ndimage

    _, parts = ndimage.label(small[0].numpy(), structure=torch.ones(3, 3).numpy())
    assert parts == 1 and small.sum() >= 150  # one column per canvas column it crosses
    assert torch.equal(small, tokens.cells(mask, 150, 200).float())  # the exact rule took over
    block = torch.zeros(1, 600, 800)
    block[0, 100:500, 200:600] = 1  # a wide region: the cells it covers at least half, as the latent's rule gives
    assert torch.equal(wr.resample_mask(block, (150, 200)), tokens.cells(block, 150, 200).float())


def test_stitch_round_trip_keeps_the_geometrys_pixel_size():
    """The geometry as the model sees it (the window resampled to the canvas), taken back by the stitch: the
    crack keeps its extent on the full-resolution target within a pixel."""
    target = torch.full((1, 1500, 2000, 3), 0.8)
    crack = torch.zeros(1, 1500, 2000)
    crack[0, 700:703, 1000:1060] = 1
    geometry = torch.where(crack[..., None] > 0, torch.zeros_like(target), target)
    win = wr.plan(crack, crack, 512)
    canvas = wr.resample_image(wr.crop(geometry, [win.box[:2]], win.size_hw), win.canvas_hw)
    out, band = wr.composite(canvas, target, crack, win, feather=0.0, levels=0)
    dark = out[0, ..., 0] < 0.4
    ys, xs = dark.nonzero(as_tuple=True)
    assert abs((xs.max() - xs.min() + 1) - 60) <= 1 and abs((ys.max() - ys.min() + 1) - 3) <= 1
    outside = ~band
    assert torch.equal(out[outside[..., None].expand_as(out)], target[outside[..., None].expand_as(target)])


# ---------------------------------------------------------------- the nodes, through ComfyUI

def crack_graph(source_wh, target_wh, crack_xywh, working_size=WORKING, ckpt="tiny-inpaint", steps=2, scene=True):
    """A geometry transfer of a crack (a box mask) from a source to a target of other sizes, composited back."""
    (sw, sh), (tw, th), (x, y, w, h) = source_wh, target_wh, crack_xywh
    prompt = {
        "1": {"class_type": "HATest_TinyCheckpoint", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "3": {"class_type": "HATest_Image", "inputs": {"name": "noise:3", "width": sw, "height": sh}},
        "4": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": sw, "height": sh}},
        "14": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": w, "height": h}},
        "15": {"class_type": "MaskComposite", "inputs": {"destination": ["4", 0], "source": ["14", 0], "x": x, "y": y,
                                                         "operation": "add"}},
        "5": {"class_type": "HATest_Image", "inputs": {"name": "checker", "width": tw, "height": th}},
        "6": {"class_type": "HA_GeometryImageEdit", "inputs": {
            "source": ["3", 0], "source_mask": ["15", 0], "target": ["5", 0],
            "shift_x": 0.0, "shift_y": 0.0, "scale": 1.0, "rotation": 0.0}},
        "7": {"class_type": "HA_ColorShift", "inputs": {"scene": ["6", 2], "mode": "mean_shift", "strength": 0.5,
                                                        "ring_width": 4}},
        "8": {"class_type": "HA_TextureAligningInversion", "inputs": {
            "model": ["1", 0], "vae": ["1", 2], "conditioning": ["2", 0], "scene": ["7", 1],
            "steps": steps, "renoise_iterations": 1, "renoise_average": 1, "attention": "texture_aligning"}},
        "9": {"class_type": "HA_LatentBlend", "inputs": {"inverted": ["8", 0], "feather": 0.0}},
        "10": {"class_type": "HA_GeometryPreservingSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0], "inverted": ["9", 0],
            "cfg": 1.0, "attention": "geometry_preserving"}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "16": {"class_type": "HA_DetailPreservingComposite", "inputs": {
            "image": ["11", 0], "target": ["5", 0], "mask": ["6", 1], "feather": 4.0, "levels": 3}},
        "12": {"class_type": "HATest_Keep", "inputs": {"value": ["16", 0]}},
    }
    if working_size is not None:
        prompt["6"]["inputs"].update(working_size=working_size, context=0.5)
    if scene:
        prompt["16"]["inputs"]["scene"] = ["7", 1]
    return prompt


@pytest.fixture(scope="module")
def spied(tiny, single_thread):
    """The tiny inpainting model with a DIFFUSION_MODEL wrapper recording the latent size of every UNet call,
    reachable as "tiny-inpaint-spy"."""
    model, clip, vae = tiny["tiny-inpaint"]
    seen = []

    def spy(executor, x, *args, **kwargs):
        seen.append(tuple(x.shape[-2:]))
        return executor(x, *args, **kwargs)

    tiny["tiny-inpaint-spy"] = (harness.with_diffusion_wrapper(model, "ha-test-spy", spy), clip, vae)
    yield seen
    del tiny["tiny-inpaint-spy"]


def test_phone_crack_onto_a_large_target(spied):
    """A 1024x768 source with a 60 px crack onto a 2000x1500 target: a 2000x1500 output, the target's own pixels
    outside the blend band, the UNet only at the working canvas, the crack's size kept."""
    spied.clear()
    out = harness.run_prompt(crack_graph((1024, 768), (2000, 1500), (500, 380, 60, 3), ckpt="tiny-inpaint-spy"))
    target, geometry_mask, scene = out["5"][0], out["6"][1], out["7"][1]
    image, band = out["16"]
    assert image.shape == (1, 1500, 2000, 3) and band.shape == (1, 1500, 2000)
    assert harness.composite_keeps_target(image, band, target)
    assert band.sum() < 0.02 * band.numel()  # a band around the crack only
    win = scene.window
    assert win.resampled and spied and set(spied) == {(win.canvas_hw[0] // 8, win.canvas_hw[1] // 8)}
    assert out["11"][0].shape[1:3] == win.canvas_hw
    # the crack's size on the output canvas is its size on the source (scale 1)
    x0, y0, x1, y1 = wr.mask_box(geometry_mask[0])
    assert abs((x1 - x0) - 60) <= 1 and abs((y1 - y0) - 3) <= 1
    assert band[0, y0:y1, x0:x1].all() and not band[0, :, :x0 - 80].any()


def test_odd_sized_target_and_rotated_phone_photo(tiny, single_thread):
    """A 1000x750 target (not a multiple of 8), with the working region and without it; a 4032x3024 source onto a
    3024x4032 target."""
    out = harness.run_prompt(crack_graph((640, 480), (1000, 750), (300, 200, 40, 4)))
    assert out["16"][0].shape == (1, 750, 1000, 3) and harness.composite_keeps_target(*out["16"], out["5"][0])
    out = harness.run_prompt(crack_graph((60, 60), (60, 60), (10, 30, 20, 4), working_size=None, scene=False))
    assert out["11"][0].shape == (1, 64, 64, 3)  # padded to the model's step inside...
    assert out["16"][0].shape == (1, 60, 60, 3) and harness.composite_keeps_target(*out["16"], out["5"][0])  # ...not out

    out = harness.run_prompt(crack_graph((4032, 3024), (3024, 4032), (2000, 1500, 120, 6)))
    image, band = out["16"]
    assert image.shape == (1, 4032, 3024, 3) and harness.composite_keeps_target(image, band, out["5"][0])
    x0, y0, x1, y1 = wr.mask_box(out["6"][1][0])
    assert (x1 - x0, y1 - y0) == (120, 6)


def test_off_is_todays_method_bit_for_bit(tiny, single_thread):
    """A saved workflow without the new inputs, the same with working_size 0 and the scene connected, and the
    pipeline's calls on the scene as HA_TextureAligningInversion made them before the working region: one result,
    bit for bit; the working region on (the active control) gives another."""
    from harmonizing_attention.nodes import pipeline

    old = harness.run_prompt(crack_graph((64, 64), (64, 64), (16, 20, 24, 4), working_size=None, scene=False))
    new = harness.run_prompt(crack_graph((64, 64), (64, 64), (16, 20, 24, 4), working_size=0))
    assert torch.equal(old["16"][0], new["16"][0]) and torch.equal(old["10"][0]["samples"], new["10"][0]["samples"])

    model, clip, vae = tiny["tiny-inpaint"]
    scene, cond = old["7"][1], old["2"][0]
    inverted = pipeline.invert(model, vae, cond, scene, 2, 1, 1, "texture_aligning")
    latent, _ = pipeline.generate(model, cond, cond, pipeline.blend_latents(inverted, 0.0), 1.0, "geometry_preserving")
    assert torch.equal(latent, old["10"][0]["samples"])
    decoded = vae.decode(latent)
    assert torch.equal(composite.composite(decoded, old["5"][0], old["6"][1], 4.0, 3), old["16"][0])

    on = harness.run_prompt(crack_graph((64, 64), (64, 64), (16, 20, 24, 4), working_size=WORKING))
    assert on["10"][0]["samples"].shape[-2:] == (16, 16)  # the 64 px target enlarged 2x (the limit), and said
    assert not torch.equal(on["16"][0], old["16"][0])


def test_several_geometries_and_targets_in_one_working_region(tiny, single_thread):
    """HA_AddGeometry (a source of a third size) grows the window to every geometry; two targets share it."""
    prompt = crack_graph((300, 200), (400, 300), (40, 40, 30, 4))
    prompt["20"] = {"class_type": "HATest_Image", "inputs": {"name": "gradient", "width": 400, "height": 300}}
    prompt["21"] = {"class_type": "ImageBatch", "inputs": {"image1": ["5", 0], "image2": ["20", 0]}}
    prompt["6"]["inputs"]["target"] = ["21", 0]
    prompt["23"] = {"class_type": "HATest_Image", "inputs": {"name": "noise:4", "width": 120, "height": 250}}
    prompt["24"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 120, "height": 250}}
    prompt["25"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 6, "height": 40}}
    prompt["26"] = {"class_type": "MaskComposite", "inputs": {"destination": ["24", 0], "source": ["25", 0], "x": 50,
                                                              "y": 150, "operation": "add"}}
    prompt["22"] = {"class_type": "HA_AddGeometry", "inputs": {
        "scene": ["6", 2], "source": ["23", 0], "source_mask": ["26", 0],
        "shift_x": 150.0, "shift_y": -80.0, "scale": 1.0, "rotation": 90.0}}
    prompt["7"]["inputs"]["scene"] = ["22", 2]
    prompt["16"]["inputs"].update(target=["21", 0], mask=["22", 1])
    out = harness.run_prompt(prompt)
    first, both = out["6"][2].window, out["22"][2].window
    union = wr.mask_box(out["22"][1])
    assert both.box[0] <= union[0] and both.box[2] >= union[2] and both.box[3] >= union[3]
    assert both.box != first.box
    image, band = out["16"]
    assert image.shape == (2, 300, 400, 3) and harness.composite_keeps_target(image, band, out["21"][0])
    assert out["10"][1]["samples"].shape[0] == 2  # a source row per geometry
    assert out["22"][2].source.shape[1:3] == (250, 300)  # the sources padded to the largest of each side


def test_notes_say_what_the_resampling_does(tiny, single_thread, caplog):
    """A thin crack shrunk by the working region is reported with the resampling and the fix; a target too small
    for the working size says so; a working size unlike the model's is noted."""
    import logging

    from harmonizing_attention.nodes.geometry import region_notes, working_notes
    from harmonizing_attention.nodes.pipeline import Scene, working_scene

    target = torch.rand(1, 1200, 1600, 3)
    crack = torch.zeros(1, 1200, 1600)
    crack[0, 600:602, 200:1400] = 1  # 2 px wide, 1200 px long: a window ~2400 px wide shrinks it ~4x
    scene = Scene(source=target, source_mask=crack, target=target, geometry=target, geometry_mask=crack,
                  working_size=512)
    notes = region_notes(working_scene(scene, 8), 8, scene.window)
    assert notes and "thinner than a latent cell for the" in notes[0] and "latent grid of the working region" in notes[0]
    assert "resampled 0.3" in notes[0] and "raise working_size or lower context" in notes[0]
    assert working_notes(scene, 1024)[0].startswith("working region: working_size is 512 but this model works best")
    small = Scene(source=target[:, :64, :64], source_mask=crack[:, :64, :64] + 1, target=target[:, :64, :64],
                  geometry=target[:, :64, :64], geometry_mask=crack[:, :64, :64] + 1, working_size=512)
    assert "too small for working_size 512" in working_notes(small, 512)[0]
    with caplog.at_level(logging.WARNING):
        harness.run_prompt(crack_graph((64, 64), (64, 64), (16, 20, 24, 4), working_size=2 * WORKING))
    assert "too small for working_size 256" in caplog.text


def test_refusals_happen_in_the_edit_node(tiny):
    prompt = crack_graph((64, 64), (64, 64), (16, 20, 24, 4), working_size=32)
    with pytest.raises(harness.PromptError, match="working_size is 32: give 0"):
        harness.run_prompt(prompt)
    prompt = crack_graph((64, 64), (64, 64), (16, 20, 24, 4), scene=False)  # a working region, no scene: named
    with pytest.raises(harness.PromptError, match="connect its scene to this node's scene input"):
        harness.run_prompt(prompt)


def test_edit_places_a_source_of_another_size_at_its_own_pixel_size():
    source = torch.rand(1, 768, 1024, 3)
    mask = torch.zeros(1, 768, 1024)
    mask[0, 380:383, 500:560] = 1
    geometry, moved = edit.place_source(source, mask, torch.rand(1, 1500, 2000, 3), edit.Placement())
    x0, y0, x1, y1 = wr.mask_box(moved[0])
    assert (x1 - x0, y1 - y0) == (60, 3)
    assert torch.equal(geometry[0, y0:y1, x0:x1], source[0, 380:383, 500:560])  # pixel for pixel


@pytest.mark.browser
def test_js_working_window_matches_window_py():
    """web/placement_math.js's workingWindow (for a view to outline where the model runs) equals window.layout on
    random boxes, sizes and working sizes, in Chromium."""
    import base64

    from playwright.sync_api import sync_playwright
    from test_app_browser import CHROMIUM, CHROMIUM_ARGS, _missing

    reason = _missing()
    if reason:
        pytest.skip(reason)
    g = torch.Generator().manual_seed(1)
    r = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    cases = []
    for i in range(200):
        ht, wt, hs, ws = r(16, 5000), r(16, 5000), r(16, 5000), r(16, 5000)
        def box(h, w):
            x0, y0 = r(0, w), r(0, h)
            return [x0, y0, r(x0, w), r(y0, h)]  # inclusive, as maskBBox gives
        cases.append({"tgt": [ht, wt], "src": [hs, ws], "geo": box(ht, wt), "sources": [box(hs, ws) for _ in range(r(1, 4))],
                      "size": (0, 64, 512, 768, 1024, 1000)[i % 6], "context": [0.5, 0.0, 1.3][i % 3]})
    code = base64.b64encode((harness.PACK_ROOT / "web" / "placement_math.js").read_bytes()).decode()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        js = browser.new_page().evaluate("""async ([code, cases]) => {
            const M = await import('data:text/javascript;base64,' + code);
            const b = (v) => ({x0: v[0], y0: v[1], x1: v[2], y1: v[3]});
            return cases.map(c => M.workingWindow(b(c.geo), c.sources.map(b), {width: c.tgt[1], height: c.tgt[0]},
                                                  {width: c.src[1], height: c.src[0]}, c.size, c.context));
        }""", [code, cases])
        browser.close()
    for case, out in zip(cases, js, strict=True):
        half_open = lambda v: (v[0], v[1], v[2] + 1, v[3] + 1)  # noqa: E731
        win = wr.layout(half_open(case["geo"]), [half_open(s) for s in case["sources"]], tuple(case["tgt"]),
                        tuple(case["src"]), case["size"], case["context"])
        assert (tuple(out["box"]), tuple(map(tuple, out["sourceOrigins"])), (out["canvas"]["height"], out["canvas"]["width"]),
                out["upscaleLimited"]) == (win.box, win.source_origins, win.canvas_hw, win.upscale_limited), case
