"""ComfyUI nodes of the pack (V3 API). Importing this package requires ComfyUI."""
from comfy_api.latest import ComfyExtension, io

from . import appearance, composite, geometry


class HarmonizingAttentionExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*geometry.NODES, *composite.NODES, *appearance.NODES]
