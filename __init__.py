"""comfyui-harmonizing-attention: training-free, attention-based image composition for ComfyUI.

Registered through ComfyUI's V3 extension API (`comfy_entrypoint`); see README.md.
"""
import logging

REQUIRED_COMFYUI = "0.3.64"
# The frontend extension (plain JS, no build step): HA_GeometryImageEdit's placement view. ComfyUI's loader
# reads WEB_DIRECTORY before it looks at NODE_CLASS_MAPPINGS / comfy_entrypoint (0.3.64 and latest alike).
WEB_DIRECTORY = "./web"

try:
    from comfy_api.latest import ComfyExtension  # noqa: F401  (present from the V3 node API on)
except ImportError as err:
    logging.error(
        "[comfyui-harmonizing-attention] needs ComfyUI %s or newer (the V3 node API, comfy_api.latest; "
        "importing it failed: %s): update ComfyUI to use the pack. Its nodes are not loaded.", REQUIRED_COMFYUI, err
    )
    NODE_CLASS_MAPPINGS = {}  # tells the old loader the pack loaded, with no nodes, instead of a second warning
else:
    from .nodes import HarmonizingAttentionExtension

    async def comfy_entrypoint() -> HarmonizingAttentionExtension:
        return HarmonizingAttentionExtension()
