"""A CUDA device on a CPU-only host, for device-placement tests of the GPU path.

``FakeTensorMode`` creates tensors on ``device="cuda"`` without a GPU (they carry shape, dtype and device, no
data) and raises ``FakeTensorDeviceMismatchError`` when a CUDA and a CPU tensor meet in an op — the bug of
a tensor created without ``device=``. On a torch build without CUDA a few *Python-level* entry points refuse
fake CUDA tensors before any op runs ("PyTorch is not linked with support for cuda devices": they open a
CUDA device guard): indexing, ``copy_``, ``contiguous`` and ``.to("cuda")``. ``fake_cuda()`` reroutes exactly
those to the equivalent aten ops, which run under the fake mode and check devices like every other op.
Autograd's backward pass needs the CUDA runtime and cannot run here; forward computations can.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

aten = torch.ops.aten
CUDA = torch.device("cuda", 0)


def _is_cuda(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == "cuda"


def _basic_view(tensor: torch.Tensor, index: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The view of ``tensor[index]`` for ints, slices, None and Ellipsis, and a leading tensor index if any."""
    explicit = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded: list = []
    for item in index:
        expanded += [slice(None)] * (tensor.dim() - explicit) if item is Ellipsis else [item]
    view, dim, tensor_index = tensor, 0, None
    for item in expanded:
        if item is None:
            view = aten.unsqueeze.default(view, dim)
            dim += 1
        elif isinstance(item, bool) or not isinstance(item, (int, slice, torch.Tensor)):
            raise NotImplementedError(f"fake_cuda indexing with {item!r}")
        elif isinstance(item, torch.Tensor):
            if dim != 0 or tensor_index is not None:
                raise NotImplementedError("fake_cuda indexing: one tensor index, on the first dimension")
            tensor_index = item
            dim += 1
        elif isinstance(item, int):
            view = aten.select.int(view, dim, item)
        else:
            view = aten.slice.Tensor(view, dim, item.start, item.stop, item.step or 1)
            dim += 1
    return view, tensor_index


class _CudaEntryPoints(TorchFunctionMode):
    """Reroutes the Python entry points that a CUDA-less build refuses for fake CUDA tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(kwargs.get("device"), int) and not isinstance(kwargs["device"], bool):
            kwargs["device"] = CUDA  # an accelerator index (torch.cuda.current_device()) means the GPU
        if func is torch.Tensor.__getitem__ and _is_cuda(args[0]):
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            view, tensor_index = _basic_view(args[0], index)
            return view if tensor_index is None else aten.index.Tensor(view, [tensor_index])
        if func is torch.Tensor.__setitem__ and _is_cuda(args[0]):
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            view, tensor_index = _basic_view(args[0], index)
            value = args[2]
            if tensor_index is not None:
                value = value if isinstance(value, torch.Tensor) else torch.full((), value, device=view.device)
                aten.index_put_.default(view, [tensor_index], value)
            elif isinstance(value, torch.Tensor):
                aten.copy_.default(view, value)
            else:
                aten.fill_.Scalar(view, value)
            return None
        if func is torch.Tensor.copy_ and _is_cuda(args[0]):
            return aten.copy_.default(args[0], args[1])
        if func is torch.Tensor.contiguous and _is_cuda(args[0]):
            return args[0] if args[0].is_contiguous() else aten.clone.default(args[0], memory_format=torch.contiguous_format)
        if func in (torch.Tensor.to, torch.Tensor.cuda):
            target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
            if func is torch.Tensor.cuda or (target is not None and torch.device(target).type == "cuda"):
                dtype = kwargs.get("dtype", next((a for a in args[1:] if isinstance(a, torch.dtype)), args[0].dtype))
                return torch.empty(args[0].shape, dtype=dtype, device=CUDA)  # a move: same shape, on the device
        return func(*args, **kwargs)


@contextmanager
def _other_function_modes_suspended() -> Iterator[None]:
    """Take active torch-function modes (megatron_dapo's CPU layer maps ``cuda`` to the CPU) off the stack."""
    suspended = []
    while torch._C._len_torch_function_stack() > 0:
        suspended.append(torch._C._pop_torch_function_stack())
    try:
        yield
    finally:
        for mode in reversed(suspended):
            torch._C._push_on_torch_function_stack(mode)


@contextmanager
def fake_cuda() -> Iterator[FakeTensorMode]:
    """Run a block with ``device="cuda"`` available: tensors are fake, mixing CPU and CUDA raises.

    megatron-core's model construction and forward do not run here: its RNG tracker and initialisation read
    tensor values (``.item()``), which fake tensors do not have.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with _other_function_modes_suspended(), mode, _CudaEntryPoints():
        yield mode
