"""Running a network only as far as one of its modules.

A forward hook captures the module's output and raises, so nothing after the module runs (the
head and later stages cost nothing); the network's own ``forward`` still orders everything before
it, so any architecture works without being rewritten.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["output_of"]


class _Stop(Exception):
    """Raised by the hook: nothing after the module needs to run."""


def output_of(model: nn.Module, module: nn.Module, images: Tensor) -> Tensor:
    """The output of ``module`` (a submodule of ``model``) when ``model`` runs on ``images``."""
    captured: list[Tensor] = []

    def hook(_module, _inputs, out):
        captured.append(out)
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        model(images)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"{type(module).__name__} did not run in the forward pass of {type(model).__name__}")
    return captured[0]
