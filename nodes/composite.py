"""The detail-preserving composite: the last step of a geometry transfer, after VAEDecode.

Node IDs are workflow identity: never rename one.
"""
from __future__ import annotations

from comfy_api.latest import io

from ..attention import window as working_region
from . import validate
from .naming import DEFECT_CATEGORY as CATEGORY
from .naming import DEFECT_WORDS, search_aliases
from .geometry import SceneType


class DetailPreservingComposite(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HA_DetailPreservingComposite",
            display_name="Crack/Defect Transfer · Composite",
            category=CATEGORY,
            description="Puts the generated defect back on the original target photo: the decoded pixels inside M_geo, the "
                        "target's own pixels outside a blend band around it (bit for bit, so the background carries "
                        "no VAE round-trip error), and a Laplacian-pyramid blend over the feathered mask between them. "
                        "With a working region (the scene input), the decoded window is resampled back into the "
                        "full-resolution target first.",
            **search_aliases(DEFECT_WORDS, "composite", "detail-preserving composite", "paste back", "stitch"),
            inputs=[
                io.Image.Input("image", tooltip="The decoded composite (VAEDecode of the sampler's latent): the "
                                                "target's size, or the working region's canvas."),
                io.Image.Input("target", tooltip="The original target image given to HA_GeometryImageEdit."),
                io.Mask.Input("mask", tooltip="M_geo: the geometry_mask output of HA_GeometryImageEdit."),
                io.Float.Input("feather", default=4.0, min=0.0, max=128.0, step=0.5,
                               tooltip="Pixels over which the blend weight falls from 1 on M_geo to 0."),
                io.Int.Input("levels", default=3, min=0, max=8,
                             tooltip="Laplacian-pyramid levels: more levels carry low frequencies (colour, shading) "
                                     "across a wider band (about 4 x 2^levels px beyond the feather). 0: a plain "
                                     "feathered blend."),
                SceneType.Input("scene", optional=True,
                                tooltip="The scene the sampler's latents were made from (HA_GeometryImageEdit, or the "
                                        "last HA_AddGeometry / HA_ColorShift): with a working region, it knows where the "
                                        "decoded window sits on the full-resolution target."),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The composite: target pixels outside blend_mask."),
                io.Mask.Output(display_name="blend_mask",
                               tooltip="1 where the composite may differ from the target (M_geo and the blend band)."),
            ],
        )

    @classmethod
    def execute(cls, image, target, mask, feather, levels, scene=None) -> io.NodeOutput:
        validate.image("image", image)
        validate.image("target", target)
        validate.mask("mask", mask)
        fix = "connect the target and the geometry_mask of the HA_GeometryImageEdit whose composite was decoded"
        validate.same_size("mask", mask, "target", target, fix)
        validate.batches("image", image.shape[0], "target", target.shape[0])
        validate.batches("image", image.shape[0], "mask", mask.shape[0])
        if scene is None:  # the whole target at its own pixels, padded at right and bottom to the model's step
            window = working_region.Window.whole(tuple(target.shape[1:3]))
            if working_region.check_decoded(image.shape[1:3], window):
                validate.same_size("image", image, "target", target, fix + (
                    ", and connect its scene to this node's scene input (it knows where a working region's window "
                    "sits on the target)"))
        else:
            window = scene.window
            validate.same_size("target", target, "the scene's target", scene.target,
                               "connect the target given to the HA_GeometryImageEdit whose scene this is")
            wrong = working_region.check_decoded(image.shape[1:3], window)
            if wrong:
                raise ValueError(f"{wrong}: connect the VAEDecode of the HA_GeometryPreservingSampler that ran on this "
                                 "scene (the scene from the same HA_GeometryImageEdit / HA_AddGeometry chain)")
        out, band = working_region.composite(image, target, mask, window, feather, levels)
        return io.NodeOutput(out, band.to(out.dtype))


NODES = [DetailPreservingComposite]
