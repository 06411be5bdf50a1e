"""Where tensors live and in which dtype: the one device policy of protonmf.

1. **Everything follows the model.** A model's device and dtype are its backbone's (the head
   weights V). What is derived from a model — another p (``with_p``), another mode
   (``with_mode``), an intervention (``intervene``), the variants an evaluation reads — lives on
   the model's device and keeps its dtypes, buffer by buffer. A new model puts its prototypes on
   its backbone's device; ``PrototypeModel.load(..., map_location=)`` puts everything there.
2. **Inputs are moved to the model where they enter** (:func:`to_model`): images and features
   go to the model's device, floating ones in its dtype, in the backbone's and the model's
   ``forward``, ``explain``, ``logits_from_features``, the evaluation and the report.
3. **Results come back where the caller's inputs were** (:func:`back_to`), in the model's output
   dtype (:func:`output_dtype`: float32, or the model's dtype if wider, e.g. float64). Quantities
   of the head (contributions, residual, bias) stay float64 whatever the model's dtype.
4. **The library never picks a device by itself**: a function computes where its model (or, for
   the NMF, its data) is, and a ``device=None`` argument means exactly that. Only entry points
   choose: a run's steps from the config (:func:`step_device`), the command line from what the
   machine has (:func:`local_device`).

``model.half()`` / ``.to(torch.bfloat16)`` rounds the head's float64 buffers too; for a
low-precision backbone use ``torch.autocast`` instead (as the extraction step does).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["back_to", "local_device", "output_dtype", "step_device", "to_model"]


def to_model(x: Tensor, ref: Tensor) -> Tensor:
    """``x`` on ``ref``'s device, and in ``ref``'s dtype if ``x`` is floating (labels keep theirs).

    ``ref`` is a tensor of the model (its head weights V). A no-op, and the same tensor (autograd
    graph included), when ``x`` is already there.
    """
    return x.to(device=ref.device, dtype=ref.dtype if x.is_floating_point() else None)


def back_to(result: Tensor, x: Tensor) -> Tensor:
    """``result`` on the device of the caller's input ``x``."""
    return result.to(x.device)


def output_dtype(ref: Tensor) -> torch.dtype:
    """The dtype of a model's logits and maps: float32, or ``ref``'s dtype if wider (float64)."""
    return torch.promote_types(ref.dtype, torch.float32)


def step_device(gpus: float, key: str) -> torch.device:
    """The device of a run's step that the config gives ``gpus`` GPUs (config key ``key``).

    CUDA when ``gpus`` > 0, else the CPU, never "CUDA if present": Ray (2.x) hides no GPU from a
    task that asked for none (it sets ``CUDA_VISIBLE_DEVICES`` only for tasks given GPUs), so that
    rule would put every CPU task of a GPU node on GPU 0, unscheduled.
    """
    if gpus <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"{key} = {gpus:g} but this worker has no CUDA device (torch {torch.__version__}, "
                           f"CUDA build {torch.version.cuda}); set {key}=0 to run this step on the CPU")
    return torch.device("cuda")


def local_device() -> torch.device:
    """The command line's device when it runs alone on a machine: CUDA if present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
