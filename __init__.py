"""comfyui-harmonizing-attention: training-free, attention-based image composition for ComfyUI.

Registered through ComfyUI's V3 extension API (`comfy_entrypoint`); see README.md.
"""
import logging

REQUIRED_COMFYUI = "0.3.64"

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
