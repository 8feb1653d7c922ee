"""Run megatron-core 0.16 on CPU (gloo) without touching its code.

megatron-core calls CUDA unconditionally in a few places (memory buffers, causal masks, RoPE, pipeline
buffers, the RNG tracker, DDP/optimizer type asserts). On a host without CUDA we redirect exactly those
calls to the CPU:

- ``torch.cuda.current_device()`` returns ``"cpu"`` (a device, not an int: a ``TorchFunctionMode`` is not
  active inside ``autograd.Function.backward``, so the value itself must already be usable as a device);
- a ``TorchFunctionMode`` maps ``device="cuda"``/integer devices, ``.cuda()`` and ``.to("cuda")`` to CPU;
- the CUDA RNG API (and megatron's private ``_get/_set_cuda_rng_state``) is served by the CPU generator;
- ``Tensor.type()`` names CPU tensors as their CUDA twins, for megatron's ``torch.cuda.FloatTensor`` asserts;
- CUDA streams and events (megatron's all-to-all MoE dispatcher copies its split sizes to the host on a side
  stream) are host objects whose waits return at once: CPU work is already ordered;
- that dispatcher's all-to-all split sizes: it turns them into numpy arrays only when moving them off a GPU
  (``moe_utils.maybe_move_tensor_to_cpu``), and gloo's ``all_to_all_single`` refuses tensors as split sizes;
- activation recompute (``tensor_parallel.checkpoint``) re-runs the forward inside ``backward``, where the mode
  is not active: its backward enters the mode itself (the causal mask is created with ``device="cuda"``).

Nothing here is used when CUDA is available. ``install()`` is idempotent.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_installed = False
_CPU = torch.device("cpu")


def _to_cpu_device(device: object) -> object:
    """Map a CUDA-ish device spec (``"cuda"``, ``"cuda:0"``, ``0``, ``torch.device("cuda")``) to CPU."""
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites device arguments of every torch call from CUDA to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1])) + tuple(args[2:])
        return func(*args, **kwargs)


def _cpu_type(self: torch.Tensor, dtype=None, non_blocking: bool = False, **kwargs):
    result = _ORIGINAL_TYPE(self, dtype, non_blocking, **kwargs)
    # The mode re-dispatches this call through the patched method, so the rename must be idempotent.
    if dtype is None and isinstance(result, str) and not result.startswith("torch.cuda."):
        return result.replace("torch.", "torch.cuda.", 1)
    return result


_ORIGINAL_TYPE = torch.Tensor.type


class _HostStream:
    """A CUDA stream's interface for CPU work, which runs in program order (nothing to wait for). A class, as
    ``torch.cuda.Stream`` is: libraries annotate with ``torch.cuda.Stream | None`` at import time."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def wait_stream(self, stream: object) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event: object = None) -> "_HostStream":
        return self  # the "event" is already complete: its synchronize() returns at once


_DEFAULT_STREAM = _HostStream()


def _host_copy(tensor: object, as_numpy: bool = False, record_stream: bool = False) -> object:
    """``maybe_move_tensor_to_cpu`` for tensors already on the host: numpy when asked, as from a GPU."""
    return tensor.numpy() if as_numpy and torch.is_tensor(tensor) else tensor


def install() -> None:
    """Install the CPU redirections; a no-op when CUDA is available or already installed."""
    global _installed
    if _installed or torch.cuda.is_available():
        return
    import megatron.core.tensor_parallel.random as mcore_random
    import megatron.core.transformer.moe.token_dispatcher as mcore_dispatcher

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.device_count = lambda: 0
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.manual_seed = torch.default_generator.manual_seed
    torch.cuda.manual_seed_all = lambda seed: None  # torch.manual_seed calls it after seeding the CPU
    torch.cuda.empty_cache = lambda: None
    torch.cuda.Stream = _HostStream
    torch.cuda.current_stream = lambda *a, **k: _DEFAULT_STREAM
    torch.cuda.stream = lambda stream: contextlib.nullcontext()
    mcore_dispatcher.maybe_move_tensor_to_cpu = _host_copy
    mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.Tensor.type = _cpu_type
    recompute_backward = mcore_random.CheckpointFunction.backward

    def backward_on_cpu(ctx, *grads):
        with _CudaToCpuMode():
            return recompute_backward(ctx, *grads)

    mcore_random.CheckpointFunction.backward = staticmethod(backward_on_cpu)
    _CudaToCpuMode().__enter__()
    _installed = True
