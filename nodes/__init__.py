"""ComfyUI nodes of the pack (V3 API). Importing this package requires ComfyUI."""
from comfy_api.latest import ComfyExtension, io

from . import appearance, composite, geometry, validate


class HarmonizingAttentionExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # every node refuses a NaN / infinite / out-of-range number in a FLOAT widget before the prompt runs
        return [validate.finite_widgets(node) for node in (*geometry.NODES, *composite.NODES, *appearance.NODES)]
