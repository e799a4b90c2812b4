"""What the pack's nodes say after a run, on the node itself (web/notes.js), in the real frontend in headless Chromium.

The user's path: the shipped SD1.5 geometry workflow with an EasyCache in front of the model, Run; the inversion
and the sampler say on the node that the step cache is suspended there (a warning, amber), the inversion also which
schedule ran (a note); a click opens every section in a readable box. Nothing covers a widget or another node and
no node grows. The next run, without the cache, replaces the notes (the sampler's bar is gone); reopening the
workflow's tab brings them back; Nodes 2.0 (1.49) shows them too.

The README's screenshot of an open box (docs/node_notes.png) is rewritten only on request:
HA_UPDATE_SCREENSHOTS=1 bash scripts/test.sh tests/test_notes_browser.py. Otherwise the screenshots go to the test's
temporary folder.
"""
import json
import time

import pytest
import test_app_browser
from test_app_browser import (DOCS, LAYOUT, UPDATE_SCREENSHOTS, WORKFLOWS, drop_workflow, fast_widgets, overlaps, press_run,
                              run_from_ui, set_widgets, ui_workflow)
from test_placement_browser import _frontend_version, _show_node

browser_page = test_app_browser.browser_page  # the app page fixture: one headless Chromium per module

pytestmark = [pytest.mark.app, pytest.mark.browser]

WORKFLOW = ui_workflow("geometry_transfer")
CKPT, INVERSION, BLEND, SAMPLER, SAVE = 1, 8, 9, 10, 12  # node IDs of the shipped workflow
WARNING_RGB = "rgb(240, 160, 48)"  # web/notes.js WARNING.accent

NOTES = "(id) => window.app.graph.getNodeById(id).haNotes?.describe() ?? null"
# a node's rectangle on the page (title bar included) and its canvas widgets' rows, in client px
NODE_BOX = """(id) => {
    const node = window.app.graph.getNodeById(id), canvas = window.app.canvas, s = canvas.ds.scale;
    const r = canvas.canvas.getBoundingClientRect(), [x, y] = canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1]]);
    const title = LiteGraph.NODE_TITLE_HEIGHT * s;
    const rows = node.widgets.filter(w => !w.element && w.y !== undefined)
        .map(w => [r.left + x, r.top + y + w.y * s, node.size[0] * s, (w.computedHeight ?? LiteGraph.NODE_WIDGET_HEIGHT) * s]);
    return {rect: [r.left + x, r.top + y - title, node.size[0] * s, node.size[1] * s + title], rows, size: [...node.size]};
}"""
INSERT_CACHE = f"""() => {{
    const graph = window.app.graph, ckpt = graph.getNodeById({CKPT});
    const cache = LiteGraph.createNode('EasyCache');
    cache.pos = [ckpt.pos[0], ckpt.pos[1] - 400];  // out of the way: the layout test below is about the shipped nodes
    graph.add(cache);
    ckpt.connect(0, cache, 0);
    for (const id of [{INVERSION}, {SAMPLER}]) {{
        const node = graph.getNodeById(id);
        cache.connect(0, node, node.inputs.findIndex(i => i.name === 'model'));
    }}
    return cache.id;
}}"""


def _notes(page, node_id: int, shown: bool | None = None, timeout: float = 15) -> dict | None:
    """The node's bar as web/notes.js describes it (None: the node has none); first waits until it is `shown` or not."""
    if shown is not None:
        page.wait_for_function(f"(want) => !!(({NOTES})({node_id})?.shown) === want", arg=shown, timeout=timeout * 1000)
    return page.evaluate(NOTES, node_id)


def _inside(inner, outer, slack: float = 0.5) -> bool:
    (x, y, w, h), (X, Y, W, H) = inner, outer
    return X - slack <= x and Y - slack <= y and x + w <= X + W + slack and y + h <= Y + H + slack


def _meets(a, b) -> bool:
    (ax, ay, aw, ah), (bx, by, bw, bh) = a, b
    return ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah


def _check_bar(page, node_id: int, tmp_path, name: str) -> dict:
    """The node's bar is drawn inside the node, below its widgets; the page's pixel under the bar's centre is the
    bar's; a screenshot of the node for the reviewer."""
    notes = _notes(page, node_id, shown=True)
    box = page.evaluate(NODE_BOX, node_id)
    assert _inside(notes["rect"], box["rect"]), (notes["rect"], box["rect"])
    assert not [row for row in box["rows"] if _meets(row, notes["rect"])], (notes["rect"], box["rows"])
    x, y, w, h = notes["rect"]
    assert h >= 18 and w > 200, notes["rect"]
    assert page.evaluate("([x, y]) => !!document.elementFromPoint(x, y)?.closest('.ha-notes-bar')",
                         [x + w / 2, y + h / 2])
    page.screenshot(path=str(tmp_path / f"{name}.png"), clip={"x": box["rect"][0] - 10, "y": box["rect"][1] - 10,
                                                             "width": box["rect"][2] + 20, "height": box["rect"][3] + 20})
    return notes


def test_notes_show_on_the_node_and_follow_the_runs(browser_page, app_server, tmp_path):
    """Run with an EasyCache on the model: the inversion's and the sampler's bars say the cache is suspended (amber),
    inside the node under its widgets, the run growing no node; the open box lists every section, warnings first, at
    13 px whatever the zoom. The next run, the cache bypassed, empties the sampler's bar (it has nothing to say);
    the tab reopened shows the last run's notes again; Nodes 2.0 shows the bar too (1.49)."""
    page = browser_page
    drop_workflow(page, WORKFLOW, name="geometry_transfer_notes.json")
    saved = {n["id"]: n["size"] for n in json.loads(WORKFLOW.read_text())["nodes"]}
    # the speaking nodes' bars hold their room from the start: the saved sizes are kept, and nothing is shown yet
    for node in (INVERSION, SAMPLER):
        assert page.evaluate(NODE_BOX, node)["size"] == saved[node]
        assert not _notes(page, node)["shown"]
    assert _notes(page, BLEND) is None  # a pack node that never speaks has no bar at all

    cache = page.evaluate(INSERT_CACHE)
    set_widgets(page, fast_widgets(json.loads((WORKFLOWS / "api" / "geometry_transfer.json").read_text())))
    run_from_ui(page, app_server, SAVE)
    _show_node(page, INVERSION)
    inversion = _check_bar(page, INVERSION, tmp_path, "inversion")
    assert inversion["level"] == "warning" and "EasyCache on the MODEL is suspended" in inversion["summary"]
    levels = [s["level"] for s in inversion["sections"]]
    # the schedule that ran, the cache, then the 64 px example's crack: thinner than a latent cell
    assert levels[:2] == ["info", "warning"] and set(levels[2:]) <= {"warning"}, inversion["sections"]
    assert inversion["sections"][0]["text"].startswith("Schedule: ddim_uniform (default), 2 steps")
    assert _bar_style(page, INVERSION)["borderLeftColor"] == WARNING_RGB
    _show_node(page, SAMPLER)
    sampler = _check_bar(page, SAMPLER, tmp_path, "sampler")
    assert [s["level"] for s in sampler["sections"]] == ["warning"], sampler["sections"]
    assert "EasyCache on the MODEL is suspended in HA_GeometryPreservingSampler" in sampler["sections"][0]["text"]
    assert _notes(page, BLEND) is None
    for node in (INVERSION, SAMPLER):  # the run grew no node
        assert page.evaluate(NODE_BOX, node)["size"] == saved[node]
    assert overlaps([n for n in page.evaluate(LAYOUT)["nodes"] if n["id"] != cache]) == []

    # a click opens every section, warnings first, at the screen's size whatever the zoom; Escape closes it
    _show_node(page, INVERSION)
    page.mouse.click(*_centre(_notes(page, INVERSION)["rect"]))
    popup = page.locator(".ha-notes-popup")
    popup.wait_for(timeout=5_000)
    shown = popup.locator(".ha-note").evaluate_all("(els) => els.map(e => e.dataset.level)")
    assert shown == sorted(levels, key=lambda level: level != "warning"), shown
    warning = popup.locator(".ha-note-warning").first
    assert "EasyCache on the MODEL is suspended in HA_TextureAligningInversion" in warning.inner_text()
    assert warning.evaluate("(e) => getComputedStyle(e).borderLeftColor") == WARNING_RGB
    box = popup.bounding_box()
    assert page.evaluate("([x, y]) => !!document.elementFromPoint(x, y)?.closest('.ha-notes-popup')",
                         [box["x"] + box["width"] / 2, box["y"] + 12])
    node = page.evaluate(NODE_BOX, INVERSION)["rect"]
    left, top = min(node[0], box["x"]) - 10, min(node[1], box["y"]) - 10
    # the README's screenshot (docs/node_notes.png) is rewritten only on request: HA_UPDATE_SCREENSHOTS=1
    page.screenshot(path=str(DOCS / "node_notes.png" if UPDATE_SCREENSHOTS else tmp_path / "popup.png"), clip={
        "x": left, "y": top, "width": max(node[0] + node[2], box["x"] + box["width"]) + 10 - left,
        "height": max(node[1] + node[3], box["y"] + box["height"]) + 10 - top})
    page.keyboard.press("Escape")
    popup.wait_for(state="detached", timeout=5_000)
    _show_node(page, INVERSION, scale=0.6)  # zoomed out: the box keeps the screen's size
    page.mouse.click(*_centre(_notes(page, INVERSION)["rect"]))
    assert popup.locator(".ha-note-text").first.evaluate("(e) => parseFloat(getComputedStyle(e).fontSize)") >= 13
    page.mouse.click(*_centre(_notes(page, INVERSION)["rect"]))  # a second click closes it
    popup.wait_for(state="detached", timeout=5_000)

    # the next run, the cache bypassed: the sampler has nothing to say and its bar empties; the inversion keeps the
    # schedule and the crack's note, no longer the cache
    page.evaluate(f"() => {{ window.app.graph.getNodeById({cache}).mode = 4; }}")
    press_run(page)  # (the same SaveImage node does not reload its image: the run is over when the sampler's bar goes)
    _notes(page, SAMPLER, shown=False, timeout=180)
    inversion = _notes(page, INVERSION, shown=True)
    assert not any("EasyCache" in s["text"] for s in inversion["sections"]), inversion["sections"]
    assert inversion["sections"][0]["text"].startswith("Schedule:")

    # another workflow opened, then this tab again: the frontend restores the last outputs, and the notes with them
    drop_workflow(page, ui_workflow("appearance_transfer"), name="appearance_notes.json")
    page.locator(".workflow-tab", has_text="geometry_transfer_notes").first.click()
    page.wait_for_function("() => window.app.extensionManager.workflow.activeWorkflow?.filename === "
                           "'geometry_transfer_notes'", timeout=30_000)
    assert _notes(page, INVERSION, shown=True)["sections"] == inversion["sections"]
    assert not _notes(page, SAMPLER)["shown"]
    assert page.errors == [], page.errors

    # Nodes 2.0: where the frontend mounts DOM widgets in its Vue nodes (1.49), the bar is there and opens the box
    vue = "async (on) => { await window.app.extensionManager.setting.set('Comfy.VueNodes.Enabled', on); }"
    page.evaluate(vue, True)
    try:
        time.sleep(1.0)
        _show_node(page, INVERSION)
        bar = page.locator(f"[data-node-id='{INVERSION}'] .ha-notes-bar")
        if _frontend_version() >= (1, 49):
            bar.wait_for(timeout=10_000)
        if bar.count():
            assert bar.is_visible() and inversion["sections"][1]["text"][:20] in bar.inner_text()
            node = page.locator(f"[data-node-id='{INVERSION}']").bounding_box()
            own = bar.bounding_box()
            assert _inside([own["x"], own["y"], own["width"], own["height"]],
                           [node["x"], node["y"], node["width"], node["height"]])
            page.screenshot(path=str(tmp_path / "vue_nodes.png"))
            bar.click()
            popup.wait_for(timeout=5_000)
            assert popup.locator(".ha-note").count() == len(inversion["sections"])
            page.keyboard.press("Escape")
            popup.wait_for(state="detached", timeout=5_000)
            # a run with nothing to say empties the bar, and the Vue node keeps its size
            page.evaluate(f"() => window.app.graph.getNodeById({INVERSION}).onExecuted({{ha_notes: []}})")
            bar.wait_for(state="hidden", timeout=5_000)
            assert page.locator(f"[data-node-id='{INVERSION}']").bounding_box() == node
        assert page.errors == [], page.errors
    finally:
        page.evaluate(vue, False)  # the server's user settings outlive this module


def _bar_style(page, node_id: int) -> dict:
    return page.evaluate("(id) => { const s = getComputedStyle(window.app.graph.getNodeById(id).haNotes.bar); "
                         "return {borderLeftColor: s.borderLeftColor, fontSize: s.fontSize}; }", node_id)


def _centre(rect):
    x, y, w, h = rect
    return x + w / 2, y + h / 2
