"""Where a model computes: `train.device` and `serving.device` (auto | cpu | cuda)."""

from __future__ import annotations

import torch


class DeviceError(RuntimeError):
    """A device setting names a device this machine does not have."""


def resolve_device(
    setting: str, cuda_available: bool | None = None, key: str = "train.device"
) -> torch.device:
    """`auto` is the GPU where torch sees CUDA, else the CPU; `cuda` on a machine without one
    is an error naming `key` (not a silent CPU run)."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if setting == "cuda" and not cuda_available:
        raise DeviceError(
            f"{key} is cuda, but torch sees no CUDA device on this machine "
            "(torch.cuda.is_available() is False): use auto or cpu"
        )
    return torch.device("cuda" if cuda_available and setting != "cpu" else "cpu")


def device_of(model: object) -> torch.device:
    """The device of a torch model's weights (the CPU for one without, e.g. ONNX Runtime's)."""
    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return first.device if first is not None else torch.device("cpu")
