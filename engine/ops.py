"""`sparse_linear`: one entry point, dispatched to the best kernel present for the weight's format
and x's device. Forced backends raise when they cannot run; only "auto" falls back (with a one-time
warning) to the plain-torch path. The kernel of each (format, backend) is the format's own entry
in the registry (engine.formats); nothing here branches on the layout."""
from __future__ import annotations

import math
import os
import warnings
from collections import Counter

import torch

from . import cpu, formats, gpu
from .formats import format_of
from .reference import check_activation

BACKENDS = ("auto", "cpu", "triton", "torch")

# (backend, format) -> number of kernel launches; tests read it to prove a fast path really ran.
# ("cpu", "csr-pair"): two CSR layers run as one call; ("cpu", "attention"): the C++ attention
# (both by engine.transformer).
calls: Counter = Counter()
_warned: set[str] = set()


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run here (extension not built, no Triton, wrong device)."""


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def cpu_unavailable_reason(x: torch.Tensor | None = None) -> str | None:
    if not cpu.available():
        return f"the C++ extension engine._C is not importable ({cpu.import_error()})"
    if x is not None and x.device.type != "cpu":
        return f"the C++ kernels run on CPU tensors, x is on {x.device}"
    return None


def triton_unavailable_reason(x: torch.Tensor | None = None) -> str | None:
    if not gpu.available():
        return f"Triton is not importable ({gpu.import_error()})"
    if x is not None and x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return (f"Triton kernels need a CUDA tensor (x is on {x.device}); set TRITON_INTERPRET=1 "
                "to run them on CPU tensors in the interpreter")
    return None


def _pick_backend(x: torch.Tensor, backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"sparse_linear: unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch":
        return backend
    if backend == "auto" and x.device.type == "cpu" and cpu.available():
        return "cpu"  # the common case, decided without building a reason string
    if backend != "auto":
        why = (cpu_unavailable_reason if backend == "cpu" else triton_unavailable_reason)(x)
        if why:
            raise BackendUnavailable(f"sparse_linear(backend={backend!r}): {why}")
        return backend
    if x.device.type == "cuda":
        why = triton_unavailable_reason(x)
        choice = "triton"
    elif x.device.type == "cpu":
        why = cpu_unavailable_reason(x)
        choice = "cpu"
    else:
        why, choice = f"no kernels for device {x.device}", "torch"
    if why:
        _warn_once(f"{x.device.type}", f"sparse_linear: falling back to plain torch: {why}")
        return "torch"
    return choice


def _check_args(x, weight, bias) -> formats.Format:
    fn = "sparse_linear"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    fmt = format_of(weight)
    if fmt is None:
        layouts = "/".join(f.cls.__name__ for f in map(formats.get, formats.names()) if f.cls is not torch.Tensor)
        raise TypeError(f"{fn}: weight must be engine.formats.{layouts} or a dense torch.Tensor, "
                        f"got {type(weight).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{fn}: x must have at least 1 dimension, got a scalar")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: x must be floating point, got {x.dtype}")
    if len(weight.shape) != 2:
        raise ValueError(f"{fn}: a {fmt.name} weight must be 2-D (out_features, in_features), got shape "
                         f"{tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"{fn}: x has {x.shape[-1]} features in its last dimension but the weight "
                         f"expects {in_f} (weight shape {tuple(weight.shape)})")
    wdev = weight.device
    if wdev != x.device:
        raise ValueError(f"{fn}: x is on {x.device} but the weight is on {wdev}")
    if bias is not None:
        if bias.shape != (out_f,):
            raise ValueError(f"{fn}: bias must have shape ({out_f},), got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"{fn}: bias is on {bias.device} but x is on {x.device}")
    return fmt


def _kernel_for(fmt: formats.Format, chosen: str, backend: str):
    """-> (backend, kernel); a layout with no kernel on the chosen backend falls back like a
    missing backend does (forced: an error; auto: plain torch with a one-time warning)."""
    kernel = fmt.kernel(chosen)
    if kernel is not None:
        return chosen, kernel
    why = f"the {fmt.name} layout has no {chosen} kernel"
    if backend != "auto":
        raise BackendUnavailable(f"sparse_linear(backend={backend!r}): {why}")
    _warn_once(f"{fmt.name}:{chosen}", f"sparse_linear: falling back to plain torch: {why}")
    return "torch", fmt.kernel("torch")


def sparse_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None, *,
                  activation: str | None = None, backend: str = "auto",
                  skip_checks: bool = False) -> torch.Tensor:
    """act(x @ Wᵀ + bias) for W in CSR, BSR or dense layout (any registered one); x is (..., in_features).

    backend: "auto" (C++ on CPU, Triton on CUDA, torch otherwise), or "cpu" | "triton" | "torch" to
    force one implementation; a forced backend that cannot run raises BackendUnavailable.
    activation: None | "relu" | "gelu" | "gelu_tanh", fused into the kernel's epilogue.
    skip_checks: for callers that validated weight, bias and activation once (SparseLinear does at
    construction and load): only x, which comes from outside, is looked at per call (its width,
    device and dtype), and a mismatch still gets the full checks' message.
    """
    if skip_checks:
        fmt = format_of(weight)
        act = activation or "none"
        if not (x.shape[-1:] == (weight.shape[1],) and x.is_floating_point() and x.device == weight.device):
            _check_args(x, weight, bias)
    else:
        fmt = _check_args(x, weight, bias)
        act = check_activation(activation)
    chosen, kernel = _kernel_for(fmt, _pick_backend(x, backend), backend)
    calls[(chosen, fmt.name)] += 1
    if x.dim() == 2:  # the common case: no reshape on the per-call path
        return kernel(x, weight, bias, act)
    lead, in_f = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(math.prod(lead), in_f)  # not -1: ambiguous when in_features == 0
    return kernel(x2, weight, bias, act).reshape(*lead, weight.shape[0])
