"""Host-agnostic math of the pack: plain torch, no ComfyUI import anywhere below this folder."""
