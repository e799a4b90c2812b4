"""The inputs of HA_GeometryImageEdit's and HA_AddGeometry's placement view (web/placement.js) after a run: the
first source, binarized source mask and target as temp PNGs under the ui key "ha_placement" (not "images", so the frontend
does not draw them as the node's preview). The view reads them when no LoadImage / LoadImageMask feeds the node.
"""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..attention import edit


def ui_output(source, source_mask, target) -> dict:
    """{"ha_placement": [{filename, subfolder, type, role}, ...]} for io.NodeOutput(ui=...)."""
    mask = edit.binarize(source_mask[:1]).unsqueeze(-1).expand(-1, -1, -1, 3)
    items = []
    for role, image in (("source", source[:1]), ("source_mask", mask), ("target", target[:1])):
        saved = ui.ImageSaveHelper.save_images(image, "ha_placement/" + role, io.FolderType.temp, None, compress_level=1)
        items.append({**saved[0], "role": role})
    return {"ha_placement": items}
