"""The array libraries the tests run the ops on: conversions from and back to NumPy (bf16 included).

Every test builds its data in NumPy, converts it to the kind under test, calls tnorm with that kind's
arrays, and converts the results back to NumPy to compare them with the float64 reference.
"""

import numpy as np
import pytest

from numerics import BF16


def torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    return torch


class NumpyKind:
    name = "numpy"

    def from_numpy(self, a):
        return np.array(a, copy=True)

    def to_numpy(self, a):
        assert isinstance(a, np.ndarray), f"expected a numpy array back, got {type(a)}"
        return a

    def is_own(self, a):
        return type(a) is np.ndarray

    def synchronize(self):
        pass


class TorchKind:
    """torch tensors on `device` ("cpu" or "cuda"). bf16 crosses as its 16 bits (torch has no ml_dtypes)."""

    def __init__(self, device):
        self.torch = torch_or_none()
        self.device = device
        self.name = f"torch-{device}"

    def from_numpy(self, a):
        torch = self.torch
        a = np.array(a, order="C")  # (np.ascontiguousarray would make a 0-d array 1-d)
        if a.dtype == BF16:
            t = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
        else:
            t = torch.from_numpy(a.copy())
        return t.to(self.device)

    def to_numpy(self, t):
        torch = self.torch
        assert isinstance(t, torch.Tensor), f"expected a torch tensor back, got {type(t)}"
        assert t.device.type == self.device, f"result on {t.device}, expected {self.device}"
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            return t.contiguous().view(torch.int16).numpy().view(BF16).reshape(tuple(t.shape))
        return t.numpy()

    def is_own(self, a):
        return isinstance(a, self.torch.Tensor) and a.device.type == self.device

    def synchronize(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()


def cpu_kinds():
    """pytest params: numpy always, torch CPU tensors when torch is importable (else skipped)."""
    params = [pytest.param(NumpyKind(), id="numpy")]
    torch = torch_or_none()
    marks = [] if torch is not None else [pytest.mark.skip(reason="torch is not installed")]
    params.append(pytest.param(TorchKind("cpu") if torch is not None else None, id="torch-cpu", marks=marks))
    return params
