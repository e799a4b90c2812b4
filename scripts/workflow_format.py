"""Convert between ComfyUI's API-format prompts and UI-format workflows (what the app saves/loads).

The shipped `workflows/api/*.json` are the source; `python scripts/workflow_format.py` rewrites each
UI twin `workflows/*.json` from it, laid out left to right by dependency depth. The tests convert
the UI files back and require the API twin, so the two never drift. Run it with the oldest supported
ComfyUI (0.3.64): the output slots written are those its nodes define, and newer frontends add theirs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _inputs(node_class) -> list[tuple[str, str, dict]]:
    """(name, type, options) of every input in declaration order (required, then optional)."""
    spec = node_class.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, value in spec.get(section, {}).items():
            kind, options = value[0], (value[1] if len(value) > 1 else {}) or {}
            out.append((name, "COMBO" if isinstance(kind, list) else kind, options))
    return out


def _widget_values(node_class, inputs: dict) -> list:
    """widgets_values as the app stores them: widget inputs in order, plus the values of the extra
    widgets the app adds (seed's control_after_generate, the image upload button)."""
    values = []
    for name, kind, options in _inputs(node_class):
        if kind in WIDGET_TYPES and not options.get("forceInput"):
            if name not in inputs and name in node_class.INPUT_TYPES().get("optional", {}):
                break  # optional widgets appended later, absent as in a workflow saved before them
            values.append(inputs[name])
            if options.get("control_after_generate") or name in ("seed", "noise_seed"):
                values.append("fixed")
    for _, _, options in _inputs(node_class):
        if options.get("image_upload"):
            values.append("image")
    return values


def api_to_ui(api: dict, classes: dict) -> dict:
    depth: dict[str, int] = {}

    def level(node_id):
        if node_id not in depth:
            links = [v for v in api[node_id]["inputs"].values() if isinstance(v, list)]
            depth[node_id] = 1 + max((level(src) for src, _ in links), default=-1)
        return depth[node_id]

    for node_id in api:
        level(node_id)
    nodes, links, rows = [], [], {}
    outputs_links: dict[tuple[str, int], list[int]] = {}
    ui_inputs: dict[str, list] = {}
    for node_id in sorted(api, key=int):
        ui_inputs[node_id] = []
        for name, kind, _ in _inputs(classes[api[node_id]["class_type"]]):  # slots in declaration order
            value = api[node_id]["inputs"].get(name)
            if isinstance(value, list):
                link_id = len(links) + 1
                links.append([link_id, int(value[0]), value[1], int(node_id), len(ui_inputs[node_id]), kind])
                outputs_links.setdefault((value[0], value[1]), []).append(link_id)
                ui_inputs[node_id].append({"name": name, "type": kind, "link": link_id})
    for node_id in sorted(api, key=int):
        node = api[node_id]
        cls = classes[node["class_type"]]
        col = depth[node_id]
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        ui_outputs = [
            {"name": names[i], "type": t, "links": outputs_links.get((node_id, i), []), "slot_index": i}
            for i, t in enumerate(cls.RETURN_TYPES)
        ]
        widgets = _widget_values(cls, node["inputs"])
        # the app draws a node as tall as its slots and widgets need: the next node of the column goes below it
        height = max(200, 40 + 22 * max(len(ui_inputs[node_id]), len(ui_outputs)) + 24 * len(widgets))
        y = rows.get(col, 40)
        rows[col] = y + height + 60
        nodes.append({
            "id": int(node_id), "type": node["class_type"], "pos": [40 + 380 * col, y],
            "size": [340, height], "flags": {}, "order": 0, "mode": 0,
            "inputs": ui_inputs[node_id], "outputs": ui_outputs,
            "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": widgets,
        })
    for order, node in enumerate(sorted(nodes, key=lambda n: (depth[str(n["id"])], n["id"]))):
        node["order"] = order
    return {
        "last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links),
        "nodes": nodes, "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4,
    }


def linked_outputs_only(ui: dict) -> dict:
    """`ui` with only the output slots that feed a link. Which unlinked slots a node has depends on the
    ComfyUI it meets (SaveImage and PreviewImage gained an IMAGE output after 0.3.64; a frontend adds the
    slots its node definition has), so comparisons of workflows leave them out."""
    ui = json.loads(json.dumps(ui))
    for node in ui["nodes"]:
        node["outputs"] = [slot for slot in node.get("outputs") or [] if slot.get("links")]
    return ui


def ui_to_api(ui: dict, classes: dict) -> dict:
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        cls = classes[node["type"]]
        inputs = {}
        for entry in node["inputs"]:
            if entry.get("link") is not None:
                link = links[entry["link"]]
                inputs[entry["name"]] = [str(link[1]), link[2]]
        values = iter(node["widgets_values"])
        optional = cls.INPUT_TYPES().get("optional", {})
        for name, kind, options in _inputs(cls):
            if kind in WIDGET_TYPES and not options.get("forceInput") and name not in inputs:
                value = next(values, values)
                if value is values:
                    if name in optional:
                        break  # a workflow saved before these optional widgets were appended: their defaults hold
                    raise ValueError(f"node {node['id']} ({node['type']}) has no widget value for {name}")
                inputs[name] = value
                if options.get("control_after_generate") or name in ("seed", "noise_seed"):
                    next(values)
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import comfy_runtime

    comfy_runtime.start(cpu=True)
    import nodes

    for api_file in sorted((comfy_runtime.PACK_ROOT / "workflows").glob("api/*.json")):
        ui = api_to_ui(json.loads(api_file.read_text()), nodes.NODE_CLASS_MAPPINGS)
        ui_file = api_file.parent.parent / api_file.name
        ui_file.write_text(json.dumps(ui, indent=1) + "\n")
        print(f"wrote {ui_file}")


if __name__ == "__main__":
    main()
