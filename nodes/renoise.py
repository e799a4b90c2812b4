"""The ReNoise settings shared by the pack's inversion nodes: their widgets and their check."""
from __future__ import annotations

from comfy_api.latest import io

MAX_ITERATIONS = 50
# why the inversion nodes suspend step caches (patch.model_notes)
STEP_CACHES = ("ReNoise evaluates the model several times at each inversion step, and a step cache would take each "
               "evaluation for a step and skip some: the inversion would fail or silently degrade.")


def inputs(paper_note: str = "") -> list:
    return [
        io.Int.Input("renoise_iterations", default=5, min=1, max=MAX_ITERATIONS,
                     tooltip=f"Model evaluations per inversion step{paper_note}. 1 is plain DDIM inversion; more "
                             "refine each step towards its implicit fixed point (ReNoise)."),
        io.Int.Input("renoise_average", default=1, min=1, max=MAX_ITERATIONS,
                     tooltip="Average the noise estimates of this many last iterations (1: no averaging)."),
    ]


def error(renoise_iterations, renoise_average) -> str | None:
    """What is wrong with the two values, or None. A node's validate_inputs names only these two inputs:
    ComfyUI then skips its own range checks for them alone (a **kwargs would disable them for all)."""
    for name, value in (("renoise_iterations", renoise_iterations), ("renoise_average", renoise_average)):
        if not 1 <= value <= MAX_ITERATIONS:
            return f"{name} is {value}: use a value from 1 to {MAX_ITERATIONS}"
    if renoise_average > renoise_iterations:
        return (f"renoise_average is {renoise_average} but renoise_iterations is {renoise_iterations}: "
                "it averages among the iterations, so set it to at most renoise_iterations")
    return None


def validate_inputs(renoise_iterations=None, renoise_average=None):
    """For a node's validate_inputs: linked (None) values are checked again in execute."""
    if renoise_iterations is None or renoise_average is None:
        return True
    return error(renoise_iterations, renoise_average) or True


def check(renoise_iterations, renoise_average) -> None:
    """For a node's execute, before any work."""
    message = error(renoise_iterations, renoise_average)
    if message:
        raise ValueError(message)
