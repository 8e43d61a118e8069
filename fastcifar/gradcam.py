"""Grad-CAM (Selvaraju et al. 2017): which image regions drive a class score, from one conv layer's activations."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import RecipeError


def _conv_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def find_target_layer(model: nn.Module) -> nn.Module:
    """The last nn.Conv2d in module order: the deepest spatial features, the usual Grad-CAM choice."""
    last: nn.Module | None = None
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            last = m
    if last is None:
        raise RecipeError(f"gradcam: {type(model).__name__} has no Conv2d layer, so Grad-CAM does not apply")
    return last


def get_layer(model: nn.Module, dotted_name: str) -> nn.Module:
    """The submodule at `dotted_name` (e.g. "layer4.1.conv2"); a RecipeError listing the conv layers if missing."""
    modules = dict(model.named_modules())
    if dotted_name in modules and dotted_name:
        return modules[dotted_name]
    convs = _conv_names(model)
    listing = ", ".join(convs[-12:]) if convs else "none"
    if len(convs) > 12:
        listing = "…, " + listing  # the deepest ones are the useful choices; a full ResNet list would be unreadable
    raise RecipeError(f"eval.gradcam_layer: {dotted_name!r} not found in {type(model).__name__} (conv layers: {listing})")


def _normalise(cam: torch.Tensor) -> torch.Tensor:
    """Per-image min-max to [0, 1]; a flat map (all zero after ReLU, or constant because the layer is 1x1 at this
    resolution) becomes all zero rather than NaN or amplified rounding noise."""
    flat = cam.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    span = hi - lo
    flat_map = span <= 1e-5 * hi.abs() + 1e-12
    out = torch.where(flat_map, torch.zeros_like(flat), (flat - lo) / span.clamp(min=1e-12))
    return out.view_as(cam)


def grad_cam(model: nn.Module, x: torch.Tensor, target: int | torch.Tensor | None = None,
             layer: nn.Module | None = None) -> torch.Tensor:
    """(B, H, W) Grad-CAM maps in [0, 1] at x's resolution, on the CPU; target None = each image's predicted class.

    Gradients are taken with torch.autograd.grad w.r.t. the hooked activation only, so no .grad is left on the
    model's parameters; the model's train/eval mode is restored and the hook removed whatever happens.
    """
    layer = layer if layer is not None else find_target_layer(model)
    captured: list[torch.Tensor] = []

    def hook(_m: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        captured.append(out)

    was_training = model.training
    handle = layer.register_forward_hook(hook)
    try:
        model.eval()
        with torch.enable_grad():
            # A leaf that requires grad guarantees a graph to the activation even if the weights are frozen.
            logits = model(x.detach().requires_grad_(True))
            if not captured:
                raise RecipeError(f"gradcam: layer {type(layer).__name__} was not used in the forward pass")
            act = captured[-1]
            if target is None:
                cls = logits.argmax(dim=1)
            else:
                cls = torch.as_tensor(target, device=logits.device).long().expand(logits.shape[0])
            score = logits.gather(1, cls[:, None]).sum()  # images are independent, so one backward serves all
            (grads,) = torch.autograd.grad(score, act)
        # Spatial mean of gradients = per-channel weight; reshape() rather than view() as channels-last
        # activations are not contiguous in NCHW order.
        weights = grads.float().mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * act.detach().float()).sum(dim=1, keepdim=True))
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return _normalise(cam[:, 0]).cpu()
    finally:
        handle.remove()
        model.train(was_training)
