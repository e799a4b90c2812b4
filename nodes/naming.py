"""How the nodes present themselves to users: the node library's category and the words node search finds them by.

Node search: the 1.27 frontend (ComfyUI 0.3.64) searches a node's ID and display name only, and its fuzzy match drops
a word that starts more than ~30 characters into the name; so the job words lead the display names
("Crack/Defect Transfer · Place"). The latest frontend also searches the V3 schema's `search_aliases`
(ComfyUI 0.33+), which carry the rest of what users call the job, and each node's former display name.
"""
from __future__ import annotations

import dataclasses

from comfy_api.latest import io

PACK = "Harmonizing Attention"
DEFECT_CATEGORY = f"{PACK}/Crack & defect transfer"
APPEARANCE_CATEGORY = f"{PACK}/Appearance transfer"

DEFECT_WORDS = ("crack", "hole", "scratch", "dent", "defect", "droplet", "stain", "chip", "damage", "anomaly",
                "defect transfer", "geometry transfer", "harmonizing attention")
APPEARANCE_WORDS = ("appearance", "texture", "material", "style", "transfer", "appearance transfer", "texture transfer",
                    "cross-image attention", "harmonizing attention")

_HAS_ALIASES = "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}


def search_aliases(words: tuple[str, ...], *extra: str) -> dict:
    """`io.Schema(**search_aliases(...))`: the aliases where this ComfyUI's schema has the field, else nothing
    (0.3.64's Schema would reject it; its frontend searches display names only)."""
    return {"search_aliases": [*words, *extra]} if _HAS_ALIASES else {}
