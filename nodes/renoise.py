"""The inversion settings shared by the pack's inversion nodes (ReNoise iterations, the schedule): their widgets,
their check, and the note saying which schedule ran."""
from __future__ import annotations

import logging

import comfy.samplers
from comfy_api.latest import io

from .pipeline import DEFAULT_SCHEDULER, at_pure_noise, sigma_path

MAX_ITERATIONS = 50
# why the inversion nodes suspend step caches (patch.model_notes)
STEP_CACHES = ("ReNoise evaluates the model several times at each inversion step, and a step cache would take each "
               "evaluation for a step and skip some: the inversion would fail or silently degrade.")


def inputs(paper_note: str = "") -> list:
    return [
        io.Int.Input("renoise_iterations", default=5, min=1, max=MAX_ITERATIONS,
                     tooltip=f"Model evaluations per inversion step{paper_note}. 1 is plain DDIM inversion; more "
                             "refine each step towards its implicit fixed point (ReNoise). Few steps need more: "
                             "ReNoise's few-step setting is 10 with renoise_average 2."),
        io.Int.Input("renoise_average", default=1, min=1, max=MAX_ITERATIONS,
                     tooltip="Average the noise estimates of this many last iterations (1: no averaging)."),
    ]


def scheduler_input() -> io.Combo.Input:
    """The schedule choice, optional and appended after a node's other inputs: a workflow saved without it runs the
    default, the schedule of earlier versions."""
    return io.Combo.Input(
        "scheduler", options=[DEFAULT_SCHEDULER, *comfy.samplers.SCHEDULER_NAMES], default=DEFAULT_SCHEDULER,
        optional=True,
        tooltip="The noise schedule (ComfyUI's schedulers), inverted here and reused by the sampler. default: DDIM's "
                "timesteps (ddim_uniform) on UNets, simple on flow models (Flux, SD3): the paper's. Distilled "
                "few-step models want the schedule they were distilled on: sgm_uniform for SDXL Turbo / Lightning "
                "/ Hyper-SD (4-8 steps), simple for Flux schnell (4 steps); with renoise_iterations 10, "
                "renoise_average 2 and the sampler's cfg 1. The node shows the sigmas that ran.")


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


def schedule_notes(model, scheduler: str, name: str, steps: int, sigmas, iterations: int,
                   total: int | None = None) -> list[str]:
    """What the node says (and logs) about the schedule that ran: the ComfyUI scheduler `name` that the `scheduler`
    choice gave, its sigmas (descending, last 0) and the model evaluations they cost per row batch; then, as a second
    item, a warning when it cannot be inverted. `total`: the steps asked of the whole schedule when `sigmas` is its
    tail (a denoise below 1)."""
    values = [float(v) for v in sigmas]
    n = len(values) - 1
    which = f"{name} (default)" if scheduler == DEFAULT_SCHEDULER else name
    count = f"{n} step{'s' * (n != 1)}" if total is None else f"the last {n} of a {total}-step schedule"
    if total is None and n != steps:
        count += f" ({name} gives them for steps = {steps})"
    ran = (f"Schedule: {which}, {count}, sigma {sigma_path(values)}. Inverted with {iterations} model evaluation"
           f"{'s' if iterations > 1 else ''} per step ({n * iterations} per batch) and generated over the same "
           f"sigmas by the sampler ({n} per batch).")
    logging.info("Harmonizing Attention: %s", ran)
    if n > 1 or not at_pure_noise(model, values[0]):
        return [ran]
    warning = (f"One step from pure noise (sigma {values[0]:.4g}, the model's maximum) cannot be inverted: ReNoise's "
               "fixed-point iteration does not converge over a single step that long (on a model whose exact "
               "inversion is known, tests/test_few_step.py, the image is not reconstructed at all). Use 2 or more "
               "steps; distilled few-step models: 4.")
    logging.warning("Harmonizing Attention: %s", warning)
    return [ran, warning]
