"""HA_GeometryImageEdit's placement view (web/placement.js) in the real frontend, in headless Chromium.

The user's path: load the shipped workflow, drag / scale / rotate the patch on the node, and the four
widgets follow by the matching number of target pixels; the run then puts M_geo where the view showed it.
The view is checked as the user sees it: its canvas's pixels (sharp at the screen's resolution, the patch's own
colours in sight, the earlier geometries under an Add Geometry's), a mask painted in the mask editor, and what a
new node says. The view's math (web/placement_math.js) is also checked number for number against attention/edit.py.

Set HA_UPDATE_SCREENSHOTS=1 to rewrite the README's screenshot (docs/placement_view.png); test runs
otherwise leave the working tree as it is.
"""
import base64
import contextlib
import math
import os
import time
from pathlib import Path

import comfy_server
import numpy as np
import pytest
import test_app_browser
from comfy_server import error_of
from test_app_browser import CHROMIUM, CHROMIUM_ARGS, WORKFLOWS, _missing, api_prompt, drop_workflow, set_widgets, ui_workflow

browser_page = test_app_browser.browser_page  # the app page fixture: one headless Chromium per module

pytestmark = [pytest.mark.app, pytest.mark.browser]

MATH_JS = comfy_server.PACK_ROOT / "web" / "placement_math.js"
SCREENSHOT = comfy_server.PACK_ROOT / "docs" / "placement_view.png"
WORKFLOW = ui_workflow("geometry_transfer")
EDIT = 6  # HA_GeometryImageEdit in the shipped workflow
MULTI = ui_workflow("multi_geometry_transfer")
ADD = 14  # the first HA_AddGeometry of the shipped multi-geometry workflow

VIEW = "(id) => window.app.graph.getNodeById(id).haPlacement.describe()"
WIDGETS = """(id) => Object.fromEntries(window.app.graph.getNodeById(id).widgets
    .filter(w => ['shift_x', 'shift_y', 'scale', 'rotation'].includes(w.name)).map(w => [w.name, w.value]))"""


# ---------------------------------------------------------------- the math, JS against Python

def test_js_placement_math_matches_edit_py():
    """anchor, landing and forward of web/placement_math.js equal attention/edit.py's on random masks,
    sizes and placements; inverse undoes forward; the drawing affine maps pixel edges like forward maps centres."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    import torch
    from harmonizing_attention.attention import edit
    from playwright.sync_api import sync_playwright

    rng = np.random.default_rng(0)
    cases = []
    for _ in range(24):
        h, w = (int(v) for v in rng.integers(8, 40, 2))
        ht, wt = (int(v) for v in rng.integers(8, 80, 2))
        mask = np.zeros((h, w), np.float32)
        y0, x0 = int(rng.integers(0, h - 2)), int(rng.integers(0, w - 2))
        mask[y0:y0 + int(rng.integers(1, h - y0)), x0:x0 + int(rng.integers(1, w - x0))] = 1
        mask *= rng.random((h, w)) > 0.3  # holes: the bbox, not the mass, defines the anchor
        mask[y0, x0] = 0.6  # soft values binarize at 0.5
        if mask.max() < 0.5:
            mask[y0, x0] = 1
        p = {"shift_x": float(rng.normal(0, 10)), "shift_y": float(rng.normal(0, 10)),
             "scale": float(rng.uniform(0.2, 3)), "rotation": float(rng.uniform(-360, 360))}
        points = rng.uniform(-5, 45, (6, 2)).tolist()
        cases.append({"h": h, "w": w, "ht": ht, "wt": wt, "mask": mask.round(3).flatten().tolist(), "p": p,
                      "points": points})

    source = MATH_JS.read_text()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page()
        js = page.evaluate("""async ([code, cases]) => {
            const M = await import('data:text/javascript;base64,' + code);
            return cases.map(c => {
                const rgba = new Uint8ClampedArray(4 * c.mask.length);
                c.mask.forEach((v, i) => { rgba[4 * i] = Math.round(v * 255); rgba[4 * i + 3] = 255; });
                const mask = M.maskFromRGBA(rgba, c.w, c.h, 'red');
                const anchor = M.anchorOf(M.maskBBox(mask, c.w, c.h));
                const src = {width: c.w, height: c.h}, tgt = {width: c.wt, height: c.ht};
                const fwd = c.points.map(q => M.forward(anchor, src, tgt, c.p, q));
                const back = fwd.map(q => M.inverse(anchor, src, tgt, c.p, q));
                const [a, b, cc, d, e, f] = M.edgeAffine(anchor, src, tgt, c.p);
                const edges = c.points.map(([x, y]) => [a * (x + 0.5) + cc * (y + 0.5) + e - 0.5,
                                                        b * (x + 0.5) + d * (y + 0.5) + f - 0.5]);
                return {anchor, landing: M.landing(anchor, src, tgt, c.p), fwd, back, edges};
            });
        }""", [base64.b64encode(source.encode()).decode(), cases])
        browser.close()

    for case, out in zip(cases, js, strict=True):
        mask = torch.tensor(case["mask"]).reshape(case["h"], case["w"])
        anchor = edit.mask_anchor(mask)
        p = edit.Placement(**case["p"])
        src_hw, tgt_hw = (case["h"], case["w"]), (case["ht"], case["wt"])
        assert out["anchor"] == list(anchor)
        np.testing.assert_allclose(out["landing"], edit._landing(anchor, src_hw, tgt_hw, p), atol=1e-9)
        expected = edit.forward(anchor, src_hw, tgt_hw, p, case["points"])
        np.testing.assert_allclose(out["fwd"], expected, atol=1e-9)
        np.testing.assert_allclose(out["back"], case["points"], atol=1e-9)
        np.testing.assert_allclose(out["edges"], expected, atol=1e-9)


def test_forward_is_what_place_source_computes():
    """edit.forward (the view's transform) against place_source itself: the moved mask's centroid is the
    forward image of the source mask's centroid, its area scale^2 times the source's."""
    import torch
    from harmonizing_attention.attention import edit

    mask = torch.zeros(48, 40)
    mask[10:30, 12:20] = 1
    mask[26:30, 20:34] = 1  # an L: a clear orientation
    for p in (edit.Placement(), edit.Placement(7, -5, 1.0, 0), edit.Placement(-3, 4, 1.5, 30),
              edit.Placement(2, 2, 0.8, -120)):
        _, moved = edit.place_source(torch.rand(1, 48, 40, 3), mask, torch.rand(1, 64, 72, 3), p)
        ys, xs = np.nonzero(moved[0].numpy())
        (cx, cy), = edit.forward(edit.mask_anchor(mask), (48, 40), (64, 72), p, [_centroid(mask.numpy())])
        assert abs(xs.mean() - cx) < 0.5 and abs(ys.mean() - cy) < 0.5, (p, xs.mean(), ys.mean(), cx, cy)
        assert abs(len(xs) / (mask.sum().item() * p.scale ** 2) - 1) < 0.08, p


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask >= 0.5)
    return float(xs.mean()), float(ys.mean())


def _orientation(mask: np.ndarray) -> float:
    """Angle (degrees, counter-clockwise on screen, in [0, 180)) of the mask's principal axis."""
    ys, xs = np.nonzero(mask >= 0.5)
    cov = np.cov(np.stack([xs, -ys]).astype(np.float64))  # y up: counter-clockwise on screen is positive
    w, v = np.linalg.eigh(cov)
    return math.degrees(math.atan2(v[1, -1], v[0, -1])) % 180


def _angle_diff(a: float, b: float) -> float:
    return abs((a - b + 90) % 180 - 90)


# ---------------------------------------------------------------- the view in the app

def _ready(page, node_id=EDIT) -> dict:
    page.wait_for_function(f"() => window.app.graph.getNodeById({node_id})?.haPlacement?.describe().ready",
                           timeout=30_000)
    return page.evaluate(VIEW, node_id)


def _drag(page, start, end, steps=8) -> None:
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=steps)
    page.mouse.up()
    time.sleep(0.1)


def _show_node(page, node_id=EDIT, scale=1.0) -> None:
    """Canvas zoom `scale`, the node at the top left (a zoom other than 1: the view is CSS-scaled)."""
    page.evaluate("""([id, scale]) => {
        const node = window.app.graph.getNodeById(id), canvas = window.app.canvas;
        canvas.ds.scale = scale;
        canvas.ds.offset = [80 / scale - node.pos[0], 140 / scale - node.pos[1]];
        canvas.setDirty(true, true);
    }""", [node_id, scale])
    time.sleep(0.4)


def _run_m_geo(app_server, prompt: dict, name: str) -> tuple[dict, np.ndarray]:
    """(the history entry, M_geo) as the server computes them: the workflow's image nodes and the edit node run, its
    mask saved and read."""
    graph = {k: prompt[k] for k in ("3", "5", str(EDIT))}
    graph["20"] = {"class_type": "MaskToImage", "inputs": {"mask": [str(EDIT), 1]}}
    graph["21"] = {"class_type": "SaveImage", "inputs": {"images": ["20", 0], "filename_prefix": f"ha_placement/{name}"}}
    entry = app_server.run(graph, timeout=60)
    assert error_of(entry) is None, error_of(entry)
    return entry, _saved_mask(app_server, entry, "21")


def _saved_mask(app_server, entry, node: str) -> np.ndarray:
    """The mask a SaveImage node of a finished run wrote (MaskToImage upstream), as bool [H, W]."""
    from PIL import Image

    item = entry["outputs"][node]["images"][0]
    with Image.open(app_server.base / "output" / item["subfolder"] / item["filename"]) as im:
        return np.asarray(im.convert("L")) >= 128


def _source_mask(app_server, prompt, node=str(EDIT)) -> np.ndarray:
    """The source mask a node's source_mask reads, as bool [H, W]: a LoadImage's MASK output (1 - alpha) or a
    LoadImageMask's channel, from the file in the server's input folder."""
    from PIL import Image

    loader, slot = prompt[node]["inputs"]["source_mask"]
    inputs = prompt[loader]["inputs"]
    channel = "alpha" if slot == 1 else inputs["channel"]
    with Image.open(app_server.base / "input" / inputs["image"].removesuffix(" [input]")) as im:
        values = np.asarray(im.convert("RGBA"))[..., {"red": 0, "green": 1, "blue": 2, "alpha": 3}[channel]]
    return values < 128 if channel == "alpha" else values >= 128


def _image(app_server, name: str) -> np.ndarray:
    """An input image's RGB, as LoadImage reads it: [H, W, 3] int."""
    from PIL import Image

    with Image.open(app_server.base / "input" / name.removesuffix(" [input]")) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def _interior(mask: np.ndarray) -> np.ndarray:
    """The mask's pixels whose 8 neighbours are in it too, as [n, 2] (x, y)."""
    inner = mask.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            inner &= np.roll(np.roll(mask, dy, 0), dx, 1)
    inner[[0, -1]] = inner[:, [0, -1]] = False
    ys, xs = np.nonzero(inner)
    return np.stack([xs, ys], 1)


def _near(shown, image: np.ndarray, points: np.ndarray, slack: int = 10) -> np.ndarray:
    """Per point: whether the colour the canvas shows lies within the colours of the image's 3x3 neighbourhood
    there (the view draws the patch smoothed), per channel, give or take `slack`."""
    out = []
    for (x, y), rgba in zip(points, shown, strict=True):
        block = image[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3)
        out.append(bool(np.all((np.array(rgba[:3]) >= block.min(0) - slack) & (np.array(rgba[:3]) <= block.max(0) + slack))))
    return np.array(out)


def _shown_at(page, node_id: int, points) -> list:
    """The RGBA the node's view canvas shows at target points (pixel-centre coordinates)."""
    return page.evaluate("([id, pts]) => window.app.graph.getNodeById(id).haPlacement.shownAt(pts)",
                         [node_id, np.asarray(points, dtype=float).tolist()])


def _forward(page, node_id: int, points) -> np.ndarray:
    """Source points (x, y) under the node's view's own transform, [n, 2] target px."""
    return np.array(page.evaluate("([id, pts]) => window.app.graph.getNodeById(id).haPlacement.forward(pts)",
                                  [node_id, np.asarray(points).tolist()]))


def _shown(page, node_id: int, mask: np.ndarray) -> np.ndarray:
    """What the view shows: the mask's pixels (x, y) under the node's view's own transform, [n, 2] target px."""
    ys, xs = np.nonzero(mask)
    return _forward(page, node_id, np.stack([xs, ys], 1))


def test_gestures_write_the_widgets_and_the_run_matches_the_view(browser_page, app_server):
    page = browser_page
    state = drop_workflow(page, WORKFLOW, name="geometry_transfer_placement.json")
    widgets = next(n["widgets"] for n in state if str(n["id"]) == str(EDIT))  # ids are strings on the latest frontend
    assert widgets[:4] == ["shift_x", "shift_y", "scale", "rotation"]
    _show_node(page, scale=1.25)
    view = _ready(page)
    assert view["target"] == {"width": 64, "height": 64} and view["source"] == {"width": 64, "height": 64}
    k = view["clientPerTargetPx"]
    assert k > 2, view  # the 64 px target is drawn large enough to drag by whole pixels

    # drag the patch: the shift follows by the screen distance over the view's zoom
    dx, dy = 37.0, -23.0
    _drag(page, view["anchor"], (view["anchor"][0] + dx, view["anchor"][1] + dy))
    values = page.evaluate(WIDGETS, EDIT)
    assert abs(values["shift_x"] - dx / k) <= 1 and abs(values["shift_y"] - dy / k) <= 1, (values, k)
    assert values["shift_x"] == round(values["shift_x"]) and values["scale"] == 1 and values["rotation"] == 0
    moved = page.evaluate(VIEW, EDIT)
    assert abs(moved["anchor"][0] - view["anchor"][0] - values["shift_x"] * k) < 0.01

    # a corner handle (it sits a few px outside the patch's box): dragged to where it stands at scale 1.5, it scales
    # the patch to 1.5 about its anchor and stays under the pointer
    ax, ay = moved["anchor"]
    (cx, cy), (bx, by) = moved["corners"][2], moved["box"][2]
    goal = (cx + 0.5 * (bx - ax), cy + 0.5 * (by - ay))
    _drag(page, (cx, cy), goal)
    values = page.evaluate(WIDGETS, EDIT)
    assert abs(values["scale"] - 1.5) <= 0.01, values
    assert math.dist(page.evaluate(VIEW, EDIT)["corners"][2], goal) < 1.5

    # the rotation handle: turned 30 degrees counter-clockwise on screen about the anchor
    view = page.evaluate(VIEW, EDIT)
    hx, hy = view["rotate"][0] - ax, view["rotate"][1] - ay
    t = math.radians(30)
    _drag(page, view["rotate"], (ax + math.cos(t) * hx + math.sin(t) * hy, ay - math.sin(t) * hx + math.cos(t) * hy),
          steps=12)
    values = page.evaluate(WIDGETS, EDIT)
    assert abs(values["rotation"] - 30) <= 0.5, values

    # arrows nudge by one target pixel, ten with Shift; typing a value moves the overlay
    page.mouse.click(*page.evaluate(VIEW, EDIT)["anchor"])
    before = page.evaluate(WIDGETS, EDIT)
    page.keyboard.press("ArrowRight")
    page.keyboard.press("Shift+ArrowDown")
    values = page.evaluate(WIDGETS, EDIT)
    assert (values["shift_x"], values["shift_y"]) == (before["shift_x"] + 1, before["shift_y"] + 10)
    view = page.evaluate(VIEW, EDIT)
    page.evaluate("""(id) => { const w = window.app.graph.getNodeById(id).widgets.find(w => w.name === 'shift_x');
        w.value = w.value - 4; w.callback?.call(w, w.value); }""", EDIT)
    typed = page.evaluate(VIEW, EDIT)
    assert abs(view["anchor"][0] - typed["anchor"][0] - 4 * k) < 0.01 and typed["anchor"][1] == view["anchor"][1]

    # the saved workflow and the API prompt carry the four widgets (and the working region's, as shipped), nothing else
    serialized = page.evaluate(f"() => window.app.graph.serialize().nodes.find(n => n.id === {EDIT})")
    values = page.evaluate(WIDGETS, EDIT)
    assert serialized["widgets_values"] == [values[n] for n in ("shift_x", "shift_y", "scale", "rotation")] + [512, 0.5]
    prompt = api_prompt(page)
    assert set(prompt[str(EDIT)]["inputs"]) == {"source", "source_mask", "target", "shift_x", "shift_y", "scale",
                                                "rotation", "working_size", "context"}
    assert page.errors == [], page.errors

    # run the image nodes and the edit; M_geo lies where the view put the patch
    view = page.evaluate(VIEW, EDIT)
    entry, m_geo = _run_m_geo(app_server, prompt, "m_geo")
    m_src = _source_mask(app_server, prompt)
    shown = _shown(page, EDIT, m_src)
    p = view["params"]
    (gx, gy), (sx, sy) = _centroid(m_geo), shown.mean(axis=0)
    assert math.hypot(gx - sx, gy - sy) < 1.0, ((gx, gy), (sx, sy))
    assert abs(m_geo.sum() / (m_src.sum() * p["scale"] ** 2) - 1) < 0.15, (m_geo.sum(), m_src.sum(), p)
    assert _angle_diff(_orientation(m_geo), (_orientation(m_src) + p["rotation"]) % 180) < 6, p
    # and the view is where the executed node put its ui images (the last-run fallback)
    assert {i["role"] for i in entry["outputs"][str(EDIT)]["ha_placement"]} == {"source", "source_mask", "target"}


def test_add_geometry_has_the_view_on_its_scene_target(browser_page, app_server):
    """HA_AddGeometry has the same view: its own source and mask over the target its scene chain starts from (the
    HA_GeometryImageEdit's LoadImage), with the geometry placed before it shown dimmed; a drag writes its four widgets,
    and the run puts its geometry where the view showed it. Its patch (scale 0.3) is small on screen: every one of
    its pixels stays in sight (the handles sit outside it), and pressing on its centre moves it."""
    page = browser_page
    drop_workflow(page, MULTI, name="multi_geometry_placement.json")
    _show_node(page, ADD, scale=1.0)
    _ready(page, EDIT)
    view = _ready(page, ADD)
    assert view["target"] == {"width": 64, "height": 64} and view["source"] == {"width": 64, "height": 64}
    assert view["params"]["scale"] == 0.3
    prompt = api_prompt(page)
    source, target = _image(app_server, prompt["3"]["inputs"]["image"]), _image(app_server, prompt["5"]["inputs"]["image"])
    mask = _source_mask(app_server, prompt, str(ADD))

    # its own patch: the canvas shows the source's colours at every inner pixel of the mask, where it lands
    inner = _interior(mask)
    landed = _forward(page, ADD, inner)
    shown = _shown_at(page, ADD, landed)
    assert len(inner) >= 20 and _near(shown, source, inner).all(), _near(shown, source, inner).mean()
    assert _near(shown, target, np.rint(landed).astype(int)).mean() < 0.5  # the check sees the patch, not the wall

    # the first geometry (the HA_GeometryImageEdit's), dimmed over the wall: between the two, not the wall alone
    first = np.rint(_forward(page, EDIT, inner)).astype(int)
    shown = np.array(_shown_at(page, ADD, first))[:, :3]
    wall = target[first[:, 1], first[:, 0]]
    nut = source[inner[:, 1], inner[:, 0]]
    assert np.abs(shown - wall).mean() > 12, np.abs(shown - wall).mean()
    assert (np.abs(shown - wall).sum(1) > np.abs(shown - (0.55 * nut + 0.45 * wall)).sum(1)).mean() > 0.9
    k = view["clientPerTargetPx"]
    before = page.evaluate(WIDGETS, ADD)
    _drag(page, view["anchor"], (view["anchor"][0] - 3 * k, view["anchor"][1] + 2 * k))
    values = page.evaluate(WIDGETS, ADD)
    assert abs(values["shift_x"] - (before["shift_x"] - 3)) <= 1 and abs(values["shift_y"] - (before["shift_y"] + 2)) <= 1
    assert (values["scale"], values["rotation"]) == (before["scale"], before["rotation"]), (before, values)
    assert page.evaluate(WIDGETS, EDIT) != values  # the first geometry's widgets are its own

    prompt = api_prompt(page)
    assert {prompt[str(ADD)]["inputs"][n] for n in ("shift_x", "shift_y")} == {values["shift_x"], values["shift_y"]}
    graph = {key: prompt[key] for key in ("3", "5", str(EDIT), str(ADD))}
    for out, (node, slot) in {"20": (str(ADD), 1), "22": (str(EDIT), 1)}.items():
        graph[out] = {"class_type": "MaskToImage", "inputs": {"mask": [node, slot]}}
        graph[str(int(out) + 1)] = {"class_type": "SaveImage",
                                    "inputs": {"images": [out, 0], "filename_prefix": f"ha_placement/add_{out}"}}
    entry = app_server.run(graph, timeout=60)
    assert error_of(entry) is None, error_of(entry)
    added = _saved_mask(app_server, entry, "21") & ~_saved_mask(app_server, entry, "23")  # union minus the first
    shown = _shown(page, ADD, _source_mask(app_server, prompt, str(ADD)))
    (gx, gy), (sx, sy) = _centroid(added), shown.mean(axis=0)
    assert added.sum() > 0 and math.hypot(gx - sx, gy - sy) < 1.0, ((gx, gy), (sx, sy))
    assert {i["role"] for i in entry["outputs"][str(ADD)]["ha_placement"]} == {"source", "source_mask", "target"}
    assert page.errors == [], page.errors


@contextlib.contextmanager
def _screen(page, dpr: float):
    """The page on a screen of device pixel ratio `dpr` (Chromium's device emulation), for the block's length."""
    cdp = page.context.new_cdp_session(page)
    size = page.viewport_size
    cdp.send("Emulation.setDeviceMetricsOverride", {**size, "deviceScaleFactor": dpr, "mobile": False})
    time.sleep(0.5)
    try:
        yield cdp
    finally:
        cdp.send("Emulation.clearDeviceMetricsOverride")
        cdp.detach()
        time.sleep(0.3)


def _capture(cdp, clip: dict, path: Path) -> None:
    """A PNG of `clip` (page px) at the emulated screen's resolution (Playwright's own screenshot resets it to 1x)."""
    data = cdp.send("Page.captureScreenshot", {"format": "png", "clip": {**clip, "scale": 1}})["data"]
    path.write_bytes(base64.b64decode(data))


def _node_clip(page, node_id: int) -> dict:
    """The node's rectangle on the page, title (and a badge above it, 1.49) included, with a small margin."""
    return page.evaluate("""(id) => {
        const node = window.app.graph.getNodeById(id), canvas = window.app.canvas;
        const [x, y] = canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1]]);
        const s = canvas.ds.scale, r = canvas.canvas.getBoundingClientRect(), title = LiteGraph.NODE_TITLE_HEIGHT * s;
        return {x: r.left + x - 8, y: r.top + y - title - 30 * s, width: node.size[0] * s + 16,
                height: node.size[1] * s + title + 30 * s + 8};
    }""", node_id)


@pytest.mark.skipif(not os.environ.get("HA_UPDATE_SCREENSHOTS"), reason="set HA_UPDATE_SCREENSHOTS=1 to rewrite "
                    "docs/placement_view.png (the README's screenshot)")
def test_readme_screenshot(browser_page, app_server):
    """The README's picture of the view: a new node's size, the example images at their full size (the source's alpha
    holds the crack's mask, as the mask editor saves it), zoom 1 on a 2x screen."""
    import shutil

    page = browser_page
    for name in ("crack_source.png", "target_brick.png"):
        shutil.copy(comfy_server.PACK_ROOT / "example_images" / name, app_server.base / "input" / f"readme_{name}")
    drop_workflow(page, WORKFLOW, name="geometry_transfer_readme.json")
    page.evaluate("""() => {
        const set = (id, name, value) => { const w = window.app.graph.getNodeById(id).widgets.find(w => w.name === name);
                                          w.value = value; w.callback?.call(w, value); };
        set(3, 'image', 'readme_crack_source.png'); set(5, 'image', 'readme_target_brick.png');
        set(6, 'shift_x', 96); set(6, 'shift_y', -64); set(6, 'scale', 1.4); set(6, 'rotation', 25);
        const n = window.app.graph.getNodeById(6); n.size[0] = 400; n.setSize([400, n.computeSize()[1]]);
        // alone in the picture: clear of the other nodes, without the canvas's statistics
        n.pos = [Math.max(...window.app.graph.nodes.map((m) => m.pos[0] + m.size[0])) + 400, 0];
        window.app.canvas.show_info = false;
    }""")
    with _screen(page, 2) as cdp:
        _show_node(page, scale=1.0)
        _ready(page)
        time.sleep(0.5)
        SCREENSHOT.parent.mkdir(exist_ok=True)
        _capture(cdp, _node_clip(page, EDIT), SCREENSHOT)
    page.evaluate("() => { window.app.canvas.show_info = true; }")
    assert page.errors == [], page.errors


def test_a_new_node_says_what_to_connect_then_draws_wide_and_sharp(browser_page, app_server):
    """A Geometry Image Edit added to the graph, at its default size: a box over the view names the three inputs to
    connect (the mask: the source Load Image's MASK, painted in the mask editor); with the target connected, the two
    others over the image. Connected, the target is drawn at least 300 px wide, and the canvas's backing store holds at
    least devicePixelRatio x its size on screen (the graph's zoom included) at zoom 1 and 2 on a 1x and a 2x screen:
    sharp at any zoom. One line of instructions stays under the view."""
    page = browser_page
    drop_workflow(page, WORKFLOW, name="geometry_transfer_new_node.json")
    node = page.evaluate("""() => { const n = LiteGraph.createNode('HA_GeometryImageEdit');
        const edit = window.app.graph.getNodeById(6);
        n.pos = [edit.pos[0], edit.pos[1] + edit.size[1] + 400]; window.app.graph.add(n); return n.id; }""")
    _show_node(page, node)
    fresh = page.evaluate(VIEW, node)
    assert not fresh["ready"] and fresh["canvas"]["notice"], fresh
    assert all(f"{role}:" in fresh["message"] for role in ("source", "source_mask", "target")), fresh["message"]
    assert "MaskEditor" in fresh["message"] and "widgets above" in fresh["message"]
    assert fresh["canvas"]["hint"].startswith("Drag")
    page.evaluate("(id) => { const g = window.app.graph; g.getNodeById(5).connect(0, g.getNodeById(id), 2); }", node)
    time.sleep(0.6)
    partial = page.evaluate(VIEW, node)
    assert partial["canvas"]["notice"] and "target:" not in partial["message"], partial["message"]
    assert "source:" in partial["message"] and "source_mask:" in partial["message"]

    page.evaluate("""(id) => { const g = window.app.graph, n = g.getNodeById(id), load = g.getNodeById(3);
        load.connect(0, n, 0); load.connect(1, n, 1); }""", node)
    view = _ready(page, node)
    assert page.evaluate(f"() => window.app.graph.getNodeById({node}).size[0]") >= 400
    assert not view["canvas"]["notice"] and view["canvas"]["css"][0] >= 300
    assert view["clientPerTargetPx"] * view["target"]["width"] >= 300, view  # the 64 px target, on a new node
    for dpr in (1, 2):
        with _screen(page, dpr):
            for zoom in (1.0, 2.0):
                _show_node(page, node, scale=zoom)
                canvas = page.evaluate(VIEW, node)["canvas"]
                assert canvas["dpr"] == dpr
                assert all(b >= dpr * c - 1 for b, c in zip(canvas["backing"], canvas["css"], strict=True)), (zoom, canvas)
    assert page.errors == [], page.errors


EDITOR = """() => Array.from(document.querySelectorAll('canvas'))
    .filter(c => c.width === 64 && c.height === 64 && c.getBoundingClientRect().width > 300).at(-1)"""  # its top layer


def test_a_mask_painted_in_the_mask_editor_reaches_the_view_and_the_run(browser_page, app_server):
    """The user's path through the app's own mask editor: a photo in the source Load Image, Open in MaskEditor, a brush
    stroke, Save (the editor uploads the painted layer; the server writes the photo with that alpha into
    input/clipspace/ and the Load Image names the file). Through the shipped wiring (source_mask = that Load Image's
    MASK), the view cuts the painted area in the photo's own colours (a 2D canvas would premultiply them to black where
    alpha is 0: pixel check), and the run's M_geo is the painted area, moved where the view shows it."""
    from PIL import Image

    page = browser_page
    yy, xx = np.mgrid[0:64, 0:64]
    colours = np.dstack([xx * 4, yy * 4, np.full_like(xx, 200)]).astype(np.uint8)  # each colour names its pixel
    Image.fromarray(colours).save(app_server.base / "input" / "painted_source.png")
    drop_workflow(page, WORKFLOW, name="geometry_transfer_painted.json")
    set_widgets(page, {3: {"image": "painted_source.png"}, EDIT: {"shift_x": 9, "shift_y": -6, "scale": 1.3, "rotation": 20}})
    page.wait_for_function("() => { const i = window.app.graph.getNodeById(3).imgs?.[0]; "
                           "return i?.complete && i.src.includes('painted_source'); }", timeout=30_000)
    page.evaluate("() => window.app.canvas.selectNode(window.app.graph.getNodeById(3))")
    page.evaluate("async () => { await window.app.extensionManager.command.execute('Comfy.MaskEditor.OpenMaskEditor'); }")
    page.wait_for_function(f"() => !!({EDITOR})()", timeout=30_000)
    time.sleep(0.5)
    # brush opacity 1 (from 0.7): the painted area is saved with alpha 0, where a 2D canvas loses the colours
    assert page.evaluate("""() => { const opacity = Array.from(document.querySelectorAll('input'))
        .filter(i => i.offsetParent && i.value === '0.7');
        for (const i of opacity) {
            i.value = '1';
            for (const e of ['input', 'change']) i.dispatchEvent(new Event(e, {bubbles: true}));
        }
        return opacity.length; }""") >= 1
    box = page.evaluate(f"() => {{ const r = ({EDITOR})().getBoundingClientRect(); return [r.x, r.y, r.width]; }}")
    x0, y0, w = box
    page.mouse.move(x0 + 0.3 * w, y0 + 0.72 * w)
    page.mouse.down()
    for i in range(1, 13):  # a stroke up and to the right, in the image's lower left
        page.mouse.move(x0 + (0.3 + 0.01 * i) * w, y0 + (0.72 - 0.02 * i) * w)
        time.sleep(0.03)
    page.mouse.up()
    time.sleep(0.3)
    assert page.evaluate("""() => { const b = Array.from(document.querySelectorAll('button'))
        .filter(b => b.offsetParent && b.innerText.trim() === 'Save'); b.at(-1)?.click(); return b.length; }""") >= 1
    page.wait_for_function("() => window.app.graph.getNodeById(3).widgets.find(w => w.name === 'image').value"
                           ".includes('clipspace')", timeout=30_000)

    prompt = api_prompt(page)
    assert prompt[str(EDIT)]["inputs"]["source_mask"] == ["3", 1], prompt[str(EDIT)]
    painted = _source_mask(app_server, prompt)  # the file the editor saved: the photo, alpha 0 where painted
    assert 40 < painted.sum() < 64 * 64 / 3 and not painted[:, 40:].any(), painted.sum()
    with Image.open(app_server.base / "input" / prompt["3"]["inputs"]["image"].removesuffix(" [input]")) as im:
        saved = np.asarray(im.convert("RGBA"))
    assert np.array_equal(saved[..., :3], colours) and (saved[..., 3][painted] == 0).mean() > 0.5  # colours under alpha 0
    _show_node(page)
    view = _ready(page)
    ys, xs = np.nonzero(painted)
    assert view["bbox"] == {"x0": int(xs.min()), "y0": int(ys.min()), "x1": int(xs.max()), "y1": int(ys.max())}
    inner = _interior(painted)
    shown = _shown_at(page, EDIT, _forward(page, EDIT, inner))
    assert len(inner) > 20 and _near(shown, colours.astype(int), inner, slack=6).all(), shown[:4]

    _, m_geo = _run_m_geo(app_server, prompt, "painted")
    (gx, gy), (sx, sy) = _centroid(m_geo), _shown(page, EDIT, painted).mean(axis=0)
    assert math.hypot(gx - sx, gy - sy) < 1.0, ((gx, gy), (sx, sy))
    assert abs(m_geo.sum() / (painted.sum() * 1.3 ** 2) - 1) < 0.15, (m_geo.sum(), painted.sum())
    assert page.errors == [], page.errors


def test_view_survives_resize_workflow_switch_and_reload(browser_page, app_server):
    """Resizing the node, switching workflows and reloading the tab raise no page error; after the reload the
    view is rebuilt from the widgets and still drags. A target that no LoadImage feeds: a placeholder, then
    the node's last run."""
    page = browser_page
    drop_workflow(page, WORKFLOW, name="geometry_transfer_reload.json")
    _show_node(page)
    _ready(page)
    page.evaluate(f"""() => {{ const n = window.app.graph.getNodeById({EDIT});
        n.setSize([n.size[0] + 200, n.size[1] + 150]); window.app.canvas.setDirty(true, true); }}""")
    time.sleep(0.3)
    _ready(page)
    page.evaluate(f"() => {{ const n = window.app.graph.getNodeById({EDIT}); n.setSize([200, 100]); }}")
    time.sleep(0.3)
    _ready(page)
    assert page.errors == [], page.errors

    other = next(p for p in sorted(WORKFLOWS.glob("*.json")) if p != WORKFLOW)
    drop_workflow(page, other)
    # back to the first tab, as the user clicks it: the node is rebuilt from the tab's saved state
    page.locator(".workflow-tab", has_text="geometry_transfer_reload").first.click()
    page.wait_for_function("() => window.app.extensionManager.workflow.activeWorkflow?.filename === "
                           "'geometry_transfer_reload'", timeout=30_000)
    _show_node(page)
    view = _ready(page)
    assert page.errors == [], page.errors

    page.mouse.click(*view["anchor"])
    page.keyboard.press("Shift+ArrowDown")  # a gesture: the app records the change and keeps it over a reload
    assert page.evaluate(WIDGETS, EDIT)["shift_y"] == 10
    time.sleep(1.0)  # the latest frontend persists the open workflow 0.5 s after its last change
    stacks = []

    def record(err):
        stacks.append(err)

    page.on("pageerror", record)
    page.reload()
    page.wait_for_function("() => window.app && window.app.graph && window.app.vueAppReady", timeout=120_000)
    # frontend 1.27's own start-up on a reload: a navigation-mode setting's onChange sets settings that are not
    # registered yet (settingStore.addSetting -> onChange -> set), whatever the packs
    assert [e.stack for e in stacks if "addSetting" not in (e.stack or "")] == []
    page.remove_listener("pageerror", record)
    page.errors.clear()
    page.wait_for_function(f"() => window.app.graph.getNodeById({EDIT})?.type === 'HA_GeometryImageEdit'",
                           timeout=30_000)
    _show_node(page)
    view = _ready(page)
    assert view["params"]["shift_y"] == 10, view["params"]
    _drag(page, view["anchor"], (view["anchor"][0] + 30, view["anchor"][1]))
    assert page.evaluate(WIDGETS, EDIT)["shift_x"] == round(30 / view["clientPerTargetPx"])
    # the wheel over the patch scales it (up: larger); a double-click resets the four values
    view = page.evaluate(VIEW, EDIT)
    page.mouse.move(*view["anchor"])
    page.mouse.wheel(0, -200)
    time.sleep(0.2)
    assert page.evaluate(WIDGETS, EDIT)["scale"] > 1.1
    page.mouse.dblclick(*page.evaluate(VIEW, EDIT)["anchor"])
    time.sleep(0.2)
    assert page.evaluate(WIDGETS, EDIT) == {"shift_x": 0, "shift_y": 0, "scale": 1, "rotation": 0}
    assert page.errors == [], page.errors

    # the target through ImageScale (64x40): no file to read, so a placeholder until the graph has run
    page.evaluate(f"""() => {{
        const graph = window.app.graph, edit = graph.getNodeById({EDIT}), load = graph.getNodeById(5);
        const scale = LiteGraph.createNode('ImageScale');
        scale.pos = [load.pos[0] + 200, load.pos[1] + 300];
        graph.add(scale);
        scale.widgets.find(w => w.name === 'width').value = 64;
        scale.widgets.find(w => w.name === 'height').value = 40;
        load.connect(0, scale, 0);
        scale.connect(0, edit, 2);
    }}""")
    time.sleep(0.6)
    placeholder = page.evaluate(VIEW, EDIT)
    assert not placeholder["ready"] and "target" in placeholder["message"], placeholder
    prompt = api_prompt(page)
    keep = {k: v for k, v in prompt.items() if v["class_type"] in ("LoadImage", "LoadImageMask", "ImageScale")
            or k == str(EDIT)}
    keep["21"] = {"class_type": "PreviewImage", "inputs": {"images": [str(EDIT), 0]}}
    # queued from the page (its client id): the node's "executed" message reaches this view
    page.evaluate("async (prompt) => { await window.app.api.queuePrompt(0, "
                  "{output: prompt, workflow: window.app.graph.serialize()}); }", keep)
    assert _ready(page)["target"] == {"width": 64, "height": 40}  # the scaled target, as the node computed it
    assert page.errors == [], page.errors


def _frontend_version() -> tuple:
    from importlib.metadata import version

    return tuple(int(v) for v in version("comfyui-frontend-package").split(".")[:2])


def test_view_in_vue_node_mode(browser_page, app_server):
    """The frontend's Vue node rendering (Nodes 2.0; a hidden experimental setting on 1.27): where the frontend
    mounts DOM widgets in Vue nodes (1.49), the view is there and drags; elsewhere the node keeps its four widgets.
    Never a page error."""
    page = browser_page
    set_vue = "async (on) => { await window.app.extensionManager.setting.set('Comfy.VueNodes.Enabled', on); }"
    page.evaluate(set_vue, True)
    try:
        drop_workflow(page, WORKFLOW, name="geometry_transfer_vue.json")
        _show_node(page)
        time.sleep(1.0)
        mounted = page.evaluate(f"() => window.app.graph.getNodeById({EDIT}).haPlacement.element.isConnected")
        if _frontend_version() >= (1, 49):
            assert mounted
        if mounted:
            view = _ready(page)
            k = view["clientPerTargetPx"]
            _drag(page, view["anchor"], (view["anchor"][0] + 40, view["anchor"][1] + 20))
            values = page.evaluate(WIDGETS, EDIT)
            assert abs(values["shift_x"] - 40 / k) <= 1 and abs(values["shift_y"] - 20 / k) <= 1, (values, k)
            # the node's own number inputs show what the gesture wrote
            shown = page.locator(f"[data-node-id='{EDIT}'] input").evaluate_all("(els) => els.map(e => e.value)")
            assert str(values["shift_x"]) in shown, shown
        assert page.evaluate(WIDGETS, EDIT).keys() == {"shift_x", "shift_y", "scale", "rotation"}
        assert page.errors == [], page.errors
    finally:
        page.evaluate(set_vue, False)  # the server's user settings outlive this module
