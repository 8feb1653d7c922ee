"""A FAKE of ``sglang.Engine`` 0.5.23 for testing the adapter on CPU hosts, where SGLang cannot run.

It is a stand-in for a GPU-only external, not the code under test, and it is labelled as such wherever it is
used. It does no inference: ``generate`` returns scripted outputs. What it does do is enforce the rules of the
real engine that the adapter depends on, each mirrored from the sglang 0.5.23 source cited beside it:

- weight updates outside a ``begin_weight_update()``/``end_weight_update()`` session are refused with
  ``(False, message)``, not raised (``srt/managers/scheduler_components/weight_updater.py:234,309-335``);
- a ``flattened_bucket`` update carries one payload per TP rank and rank r reads entry r only
  (``srt/managers/tp_worker.py:194-201``); each entry must come from the GPU of TP rank r and be a distinct
  object (one payload shared by all ranks shares one CUDA-IPC ref-counter and makes every worker read one GPU:
  silent in SGLang, an error here);
- unknown tensor names or ``load_format``s, releasing while requests run, resuming a tag that was not released,
  and loading weights into released memory crash the scheduler, which in SGLang kills the whole job
  (``weight_updater.py:337-422``, ``srt/managers/scheduler.py:2253,6370``): here they raise ``SchedulerDied``;
- ``generate``/``async_generate`` output: ``output_ids`` include the stop token, ``meta_info.output_token_logprobs``
  are ``(logprob, token_id, None)`` tuples, ``finish_reason`` is ``{"type": "stop"|"length"|"abort", ...}``
  (``srt/managers/schedule_batch.py:279-345,1856-1878``); with ``skip_tokenizer_init`` only the model config's
  EOS ids and ``stop_token_ids`` stop (``srt/configs/model_config.py:2190-2208``); ``abort_request(abort_all=True)``
  makes running requests return at once with ``finish_reason`` abort (``srt/managers/scheduler.py:5798-5812``);
- ``sampling_seed`` is honoured only in deterministic-inference mode, silently ignored otherwise, and fatal with
  ``min_p > 0`` (``srt/sampling/sampling_batch_info.py:127-171``, ``srt/layers/sampler.py:829-833``);
- ``fake_engine_class`` stands in for ``sglang.Engine(**server_args)`` itself: it writes into the *calling*
  process's environment what the real constructor writes there for the adapter's arguments, in the source's
  order (``engine_environment_writes``), then starts, or fails as a scheduler that dies during start-up does
  (``srt/entrypoints/engine.py:2002-2010``), or takes as long as it is told to;
- routed experts (routing replay): a request asking ``return_routed_experts`` gets ``meta_info["routed_experts"]``,
  base64 of int32 ``[prompt + output − 1, layers, top-k]`` ids, only when the engine was started with
  ``enable_return_routed_experts``; otherwise nothing, silently, as the real one has no capturer then
  (``srt/managers/scheduler_components/batch_result_processor.py:_maybe_collect_routed_experts``,
  ``srt/managers/tokenizer_manager.py:2602-2609``); ``routes(ids)`` scripts them;
- ``serialize`` is ``MultiprocessingSerializer.serialize`` (base64 only with ``output_str=True``); the
  in-process engine takes ``flattened_bucket`` payloads as base64 strings or raw pickle bytes and decodes the
  former (``srt/entrypoints/engine.py:1743-1754``, ``srt/utils/common.py:3060-3126``).
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import pickle
import random
import time
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Callable

import numpy as np
import torch

TAGS = ("kv_cache", "weights", "cuda_graph")  # srt/constants.py:2-9
OUTSIDE_SESSION = "update_weights_from_tensor must run between begin_weight_update() and end_weight_update()"


def engine_environment_writes(tp_size: int, enable_deterministic_inference: bool, environ=os.environ) -> None:
    """What ``sglang.Engine()`` 0.5.23 writes into the calling process's environment for the adapter's
    arguments (one node, CUDA, CUDA graphs on, no symmetric memory, KV sharding, DCP, metrics or crash dumps),
    in the order it writes them:

    - ``ServerArgs.resolve_once`` → ``handle_deterministic_inference`` with TP > 1
      (``srt/arg_groups/attention_hook.py:672-698``; channels: ``SGLANG_DETERMINISTIC_NCCL_NCHANNELS``,
      default 8, ``srt/environ.py:1531``);
    - ``_graph_may_capture_collectives`` with TP > 1 → ``NCCL_GRAPH_REGISTER`` default 0
      (``srt/arg_groups/parallel_hook.py:369-425``);
    - ``_set_envs_and_config`` (``srt/entrypoints/engine.py:1878-1938``).
    """
    if enable_deterministic_inference and tp_size > 1:
        environ["NCCL_ALGO"] = "allreduce:tree"
        nchannels = str(int(environ.get("SGLANG_DETERMINISTIC_NCCL_NCHANNELS", "8")))
        environ["NCCL_MIN_NCHANNELS"] = nchannels
        environ["NCCL_MAX_NCHANNELS"] = nchannels
    if tp_size > 1:
        environ.setdefault("NCCL_GRAPH_REGISTER", "0")
    if "NCCL_CUMEM_ENABLE" not in environ:
        environ["NCCL_CUMEM_ENABLE"] = "0"
    if "NCCL_NVLS_ENABLE" not in environ:
        environ["NCCL_NVLS_ENABLE"] = "0"
    environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "8"
    if environ.get("TRTLLM_ENABLE_PDL", "1") != "0":
        environ["TRTLLM_ENABLE_PDL"] = "1"
    if environ.get("CUTE_DSL_LOG_LEVEL") is None:
        environ["CUTE_DSL_LOG_LEVEL"] = "30"
    if environ.get("CUTE_DSL_LOG_TO_CONSOLE") is None:
        environ["CUTE_DSL_LOG_TO_CONSOLE"] = "1"
    environ["SGLANG_RUN_ID"] = f"sglang-run-{time.time()}-{random.randint(0, 100000000)}"


SCHEDULER_DIED = ("Rank 0 scheduler died during initialization (exit code: -9). If exit code is -9 (SIGKILL), a "
                  "common cause is the OS OOM killer. Run `dmesg -T | grep -i oom` to check.")


def fake_engine_class(weight_shapes: dict[str, tuple[int, ...]], fail: bool = False, start_seconds: float = 0.0):
    """A FAKE ``sglang.Engine`` constructor: the environment writes of the real one, then a ``FakeSGLangEngine``
    (``fail``: the start-up error of a scheduler killed while loading; ``start_seconds``: a slow start)."""

    def engine(*, model_path: str, tp_size: int = 1, enable_deterministic_inference: bool = False,
               nccl_port: int | None = None, enable_return_routed_experts: bool = False, **server_args) -> FakeSGLangEngine:
        engine_environment_writes(tp_size, enable_deterministic_inference)
        time.sleep(start_seconds)  # waiting for the schedulers (srt/entrypoints/engine.py:2013-2040)
        if fail:
            raise RuntimeError(SCHEDULER_DIED)
        fake = FakeSGLangEngine(tp_size, weight_shapes, deterministic=enable_deterministic_inference,
                                enable_return_routed_experts=enable_return_routed_experts)
        fake.server_args = dict(server_args, model_path=model_path, tp_size=tp_size, nccl_port=nccl_port,
                                enable_deterministic_inference=enable_deterministic_inference)
        return fake

    return engine


def serialize(obj, output_str: bool = False):
    """``MultiprocessingSerializer.serialize`` as in ``srt/utils/common.py:3060-3082`` (for CPU tensors)."""
    buf = io.BytesIO()
    ForkingPickler(buf).dump(obj)
    output = buf.getvalue()
    return base64.b64encode(output).decode("utf-8") if output_str else output


class FlattenedTensorBucket:
    """FAKE of ``srt/weight_sync/tensor_bucket.py:19-80`` (construction from named tensors): each tensor
    flattened to bytes, concatenated, with its name, shape, dtype and byte range."""

    def __init__(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        flat, self.metadata, start = [], [], 0
        for name, tensor in named_tensors:
            flat.append(tensor.flatten().view(torch.uint8))
            self.metadata.append({"name": name, "shape": tensor.shape, "dtype": tensor.dtype, "start_idx": start,
                                  "end_idx": start + flat[-1].numel()})
            start += flat[-1].numel()
        self.flattened_tensor = torch.cat(flat)

    def get_flattened_tensor(self) -> torch.Tensor:
        return self.flattened_tensor

    def get_metadata(self) -> list[dict]:
        return self.metadata


def looks_like_pickle_payload(data: bytes) -> bool:
    """How SGLang tells raw payload bytes from base64 (``srt/utils/common.py:3105-3106``)."""
    return len(data) >= 2 and data[0] == 0x80 and data[1] <= pickle.HIGHEST_PROTOCOL


class SchedulerDied(RuntimeError):
    """What SGLang does on these errors: the scheduler process dies and SIGQUITs the trainer (the job ends)."""


@dataclass
class FlushResult:
    success: bool
    message: str = ""


@dataclass
class FakePayload:
    """What the fake serializer produces for one rank: the rank that made it and its flat tensors."""

    producer_rank: int
    tensors: dict[str, torch.Tensor]


def fake_serializer(rank_of: Callable[[], int]) -> Callable[[list], FakePayload]:
    """A FAKE of the CUDA-IPC serialisation: copies the bucket and records which rank (GPU) produced it."""

    def serialize(named_tensors):
        return FakePayload(rank_of(), {name: tensor.detach().clone() for name, tensor in named_tensors})

    return serialize


class _FakeTokenizerManager:
    def __init__(self, engine: "FakeSGLangEngine") -> None:
        self.engine = engine

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        """Fire-and-forget (``srt/managers/tokenizer_manager.py:2241-2265``): aborted requests finish "abort"."""
        self.engine.calls.append(("abort_request", abort_all))
        if abort_all:
            self.engine.in_flight = 0
            self.engine.abort_epoch += 1  # every request running now returns "abort"

    async def flush_cache(self, timeout_s: float | None = None) -> FlushResult:
        """Waits until the scheduler is idle, then flushes (``scheduler_components/flush_wrapper.py:22-61``)."""
        self.engine.calls.append(("tokenizer_manager.flush_cache", timeout_s))
        self.engine.in_flight = 0  # the running requests finish while we wait
        return FlushResult(True)

    async def update_weight_version(self, request) -> None:
        self.engine.calls.append(("update_weight_version", request.new_version))
        self.engine.weight_version = request.new_version


class FakeSGLangEngine:
    """FAKE ``sglang.Engine`` (0.5.23 method names and rules, no inference)."""

    def __init__(self, tp_size: int, weight_shapes: dict[str, tuple[int, ...]], group_ranks: list[int] | None = None,
                 eos_token_ids: tuple[int, ...] = (1,), script: Callable[[list[int], dict], list[int]] | None = None,
                 deterministic: bool = True, delay: Callable[[list[int]], float] = lambda ids: 0.0,
                 enable_return_routed_experts: bool = False, route_shape: tuple[int, int] = (2, 2)):
        self.tp_size = tp_size
        self.group_ranks = group_ranks or list(range(tp_size))  # the rank whose GPU each TP rank runs on
        self.weight_shapes = weight_shapes
        self.weights: dict[str, torch.Tensor] = {}
        self.eos_token_ids = eos_token_ids
        self.script = script or (lambda ids, params: [7, 7, 1])
        self.calls: list[tuple] = []
        self.session = False
        self.offload_tags: set[str] = set()
        self.in_flight = 0
        self.weight_version = "default"
        self.deterministic, self.delay = deterministic, delay
        self.enable_return_routed_experts, self.route_shape = enable_return_routed_experts, route_shape
        self.ignored_seeds = 0
        self.abort_epoch = 0
        self.tokenizer_manager = _FakeTokenizerManager(self)
        self.loop = asyncio.new_event_loop()

    # ------------------------------------------------------------------ weight updates
    def begin_weight_update(self) -> tuple[bool, str]:
        self.calls.append(("begin_weight_update",))
        if self.session:
            return False, "a weight-update session is already open; call end_weight_update() first"
        self.session = True
        return True, "Success"

    def end_weight_update(self) -> tuple[bool, str]:
        self.calls.append(("end_weight_update",))
        if not self.session:
            return False, "no weight-update session is open; call begin_weight_update() first"
        self.session = False
        return True, "Success"

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True) -> tuple[bool, str]:
        self.calls.append(("update_weights_from_tensor", load_format, flush_cache, len(named_tensors)))
        if not self.session:
            return False, OUTSIDE_SESSION
        if load_format != "flattened_bucket":
            raise SchedulerDied(f"the fake models only load_format='flattened_bucket' (got {load_format!r})")
        if len(named_tensors) < self.tp_size:
            raise SchedulerDied(f"TP rank {len(named_tensors)} has no payload: {len(named_tensors)} for tp_size {self.tp_size}")
        if len({id(p) for p in named_tensors[: self.tp_size]}) < self.tp_size:
            raise SchedulerDied("one payload object serves several TP ranks: they would share one IPC ref-counter and GPU")
        if "weights" in self.offload_tags:
            raise SchedulerDied("weights loaded into released memory (resume 'weights' first)")
        for tp_rank in range(self.tp_size):  # each TP worker deserialises its own entry
            payload = named_tensors[tp_rank]
            if payload.producer_rank != self.group_ranks[tp_rank]:
                raise SchedulerDied(
                    f"TP rank {tp_rank} (GPU of rank {self.group_ranks[tp_rank]}) got tensors of rank {payload.producer_rank}'s GPU"
                )
            for name, tensor in payload.tensors.items():
                if name not in self.weight_shapes:
                    raise SchedulerDied(f"load_weights: unknown parameter {name!r}")
                if tuple(tensor.shape) != tuple(self.weight_shapes[name]):
                    raise SchedulerDied(f"load_weights: {name} has shape {tuple(tensor.shape)}, the model {self.weight_shapes[name]}")
                if tp_rank == 0:
                    self.weights[name] = tensor
        if flush_cache and self.in_flight:
            return False, "Weights were updated, but the cache was not flushed because requests are still running or queued."
        return True, "Success"

    def flush_cache(self) -> FlushResult:
        self.calls.append(("flush_cache",))
        return FlushResult(self.in_flight == 0, "" if self.in_flight == 0 else "requests are running")

    # ------------------------------------------------------------------ memory
    def release_memory_occupation(self, tags=None) -> None:
        tags = list(tags or TAGS)
        self.calls.append(("release_memory_occupation", tuple(tags)))
        if self.in_flight:
            raise SchedulerDied("release_memory_occupation should be called only when server is idle.")
        self.offload_tags.update(tags)

    def resume_memory_occupation(self, tags=None) -> None:
        tags = list(tags or TAGS)
        self.calls.append(("resume_memory_occupation", tuple(tags)))
        for tag in tags:
            if tag not in self.offload_tags:
                raise SchedulerDied(f"KeyError: {tag!r} (offload_tags.remove of a tag that was not released)")
            self.offload_tags.remove(tag)

    # ------------------------------------------------------------------ generation
    def generate(self, input_ids, sampling_params, return_logprob=False, rid=None, return_routed_experts=False):
        self.calls.append(("generate", [list(ids) for ids in input_ids], sampling_params, return_logprob))
        return self._outputs(input_ids, sampling_params, return_logprob, return_routed_experts)

    async def async_generate(self, input_ids, sampling_params, return_logprob=False, rid=None, return_routed_experts=False):
        self.calls.append(("async_generate", [list(ids) for ids in input_ids], sampling_params, return_logprob, rid))
        self.in_flight += 1
        started_in = self.abort_epoch
        await asyncio.sleep(self.delay(input_ids[0]))
        if self.abort_epoch != started_in:
            return [{"output_ids": [], "meta_info": {"finish_reason": {"type": "abort", "message": "Aborted"},
                                                     "output_token_logprobs": []}} for _ in input_ids]
        self.in_flight = max(self.in_flight - 1, 0)
        return self._outputs(input_ids, sampling_params, return_logprob, return_routed_experts)

    @staticmethod
    def routes(ids: list[int], layers: int, top_k: int) -> np.ndarray:
        """The scripted experts of the forwarded tokens ``ids``: token t, layer l, slot j → (t + l + j) mod 8."""
        t, layer, slot = np.meshgrid(np.array(ids), np.arange(layers), np.arange(top_k), indexing="ij")
        return ((t + layer + slot) % 8).astype(np.int32)

    def _outputs(self, input_ids, sampling_params, return_logprob, return_routed_experts=False):
        if self.offload_tags:
            raise SchedulerDied(f"generation with released memory {sorted(self.offload_tags)}")
        params_list = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(input_ids)
        outputs = []
        for ids, params in zip(input_ids, params_list):
            if params.get("sampling_seed") is not None:
                if params.get("min_p", 0.0) > 0:
                    raise SchedulerDied("With sampling seed, multinomial_with_seed will provide wrong results")
                self.ignored_seeds += not self.deterministic
            stops = set(self.eos_token_ids) | set(params.get("stop_token_ids") or ())
            tokens, reason = [], {"type": "length", "length": params.get("max_new_tokens", 128)}
            for token in self.script(list(ids), params)[: params.get("max_new_tokens", 128)]:
                tokens.append(token)
                if token in stops:
                    reason = {"type": "stop", "matched": token}
                    break
            meta = {"id": f"{len(outputs):06d}", "finish_reason": reason, "prompt_tokens": len(ids),
                    "completion_tokens": len(tokens), "weight_version": self.weight_version}
            if return_logprob:
                meta["output_token_logprobs"] = [(-0.25, token, None) for token in tokens]
            if return_routed_experts and self.enable_return_routed_experts:
                forwarded = (list(ids) + tokens)[:-1]
                meta["routed_experts"] = base64.b64encode(self.routes(forwarded, *self.route_shape).tobytes()).decode()
            outputs.append({"output_ids": tokens, "meta_info": meta})
        return outputs

    def shutdown(self) -> None:
        self.calls.append(("shutdown",))
