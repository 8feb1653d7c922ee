"""Colocated SGLang rollout engines (GPU only) behind ``RolloutEngine``, written against sglang 0.5.23.

It has not run here (SGLang needs CUDA). Its calls are tested against a labelled fake of ``sglang.Engine``
that enforces the rules below (tests/unit/test_sglang_engine.py). Citations are files of the sglang 0.5.23
wheel.

One SGLang engine serves a group of ranks whose GPUs it spans with tensor parallelism. The group's first rank
hosts the ``sglang.Engine`` (``engine`` here); every rank of the group holds this adapter, because each hands
over its own GPU's copy of the weights. Rules followed:

- **Weight-update sessions.** ``update_weights_from_tensor`` is accepted only between ``begin_weight_update()``
  and ``end_weight_update()``; outside one it returns ``(False, message)`` without raising
  (``srt/managers/scheduler_components/weight_updater.py:234,309-335``). Every returned ``(success, message)``
  is checked; a refusal raises ``SGLangError`` with SGLang's message (docs/pitfalls.md, 19).
- **One payload per engine TP rank.** TP rank r deserialises only entry r of the payload list
  (``srt/managers/tp_worker.py:194-201``). Each rank of the group serialises the flattened bucket from its own
  GPU and the host gathers them in rank order — as SGLang's ``weight_sync/utils.py`` does — after
  ``monkey_patch_torch_reductions`` so that a GPU travels by UUID (``srt/utils/patch_torch.py:41``)
  (docs/pitfalls.md, 21). One bucket may mix dtypes (``weight_sync/tensor_bucket.py:25``).
- **Memory.** ``release_memory_occupation``/``resume_memory_occupation`` are synchronous: the memory is free
  when they return (``weight_updater.py:337-422``). A release asserts the scheduler is idle, so the host first
  waits for idleness (``tokenizer_manager.flush_cache(timeout_s)``). Resuming a tag that was not released
  raises in the scheduler and kills the job (``offload_tags.remove``; ``srt/managers/scheduler.py:6370``): the
  adapter tracks what it released and resumes only that (docs/pitfalls.md, 20). Weights are discarded on
  release (no CPU backup), so every resume of ``weights`` is followed by a full sync.
- **Cache.** The prefix/KV cache is flushed once the last bucket is in (docs/pitfalls.md, 14);
  ``torch.cuda.ipc_collect`` runs after each bucket and a bucket's memory is copied before the resharder
  reuses it (docs/pitfalls.md, 15).
- **Start.** In training the engine starts with ``load_format="dummy"`` (random weights, nothing read from
  disk): the trainer releases its memory at once and syncs the actor's weights before the first generation.
  ``megatron-dapo eval`` starts it with ``load_format="auto"``, the folder's weights. ``sglang.Engine()``
  resolves its arguments in the calling (trainer) process and writes its own environment there before it
  spawns its schedulers: ``NCCL_ALGO``/``NCCL_MIN_NCHANNELS``/``NCCL_MAX_NCHANNELS`` in deterministic mode with
  TP > 1 (``srt/arg_groups/attention_hook.py:676-698``), ``NCCL_GRAPH_REGISTER``
  (``srt/arg_groups/parallel_hook.py:425``), ``CUDA_DEVICE_MAX_CONNECTIONS=8``, ``NCCL_CUMEM_ENABLE``,
  ``NCCL_NVLS_ENABLE`` and more (``srt/entrypoints/engine.py:1878-1938``). Only the host rank runs it, and
  the trainer's own NCCL communicators are created lazily, later: so the host's environment is restored once
  the engine is up (its processes have inherited theirs), and every rank keeps the one ``slurm/env.sh`` set
  (docs/pitfalls.md, 31). Start-up has a deadline (``rollout.engine_start_timeout_s``); its failure, or
  SGLang's, reaches every rank of the job at once (``run_on_ranks``) instead of leaving the group's other
  ranks in a collective until the process-group timeout (docs/pitfalls.md, 32). The scheduler's NCCL port is
  fixed per engine, outside the rendezvous ports (``ENGINE_NCCL_PORT_BASE``; docs/pitfalls.md, 34).
- **Sampling.** With ``skip_tokenizer_init`` only the model config's EOS ids stop generation
  (``srt/configs/model_config.py:2190-2208``): the tokenizer's EOS goes in ``stop_token_ids``. Reported
  log-probs are ``log_softmax(logits / T)``, not renormalised over top-p (``srt/layers/sampler.py:273-317``).
  ``finish_reason`` is ``stop``, ``length`` or ``abort`` (``srt/managers/schedule_batch.py:279-345``). Each
  sample carries its own ``sampling_seed`` (derived from its group's), honoured in deterministic-inference
  mode (``srt/sampling/sampling_batch_info.py:127-171``); ``min_p`` is never sent, which that mode would
  reject fatally (``srt/layers/sampler.py:829-833``).
- **Streaming.** Each group is one ``async_generate`` request of its n samples on the engine's event loop
  (``srt/entrypoints/engine.py:545-648``); ``collect`` returns the groups done so far, waiting for at least one.
  ``abort`` sends ``abort_request(abort_all=True)``: running requests return at once with ``finish_reason``
  abort and are dropped (``srt/managers/scheduler.py:5798-5812``). Request ids have a fixed width because
  SGLang aborts by prefix.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron_dapo.errors import UserError
from megatron_dapo.rollout.base import GroupRequest, RolloutEngine
from megatron_dapo.samples import RolloutSample
from megatron_dapo.weights.transfer import Bucket

MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")
# The scheduler's torch.distributed port: this + the host's LOCAL_RANK (engines of one node differ). Left to
# SGLang it is drawn from 22000-29999 (srt/utils/network.py:205), where slurm/launch.sh's MASTER_PORT
# (20000-29999) and torchrun's 29500 live; 31000-31007 is below Linux's ephemeral range (32768+) too.
ENGINE_NCCL_PORT_BASE = 31000


class SGLangError(UserError, RuntimeError):
    """SGLang refused a request; the message is SGLang's."""


def serialize_flattened_bucket(named_tensors: Bucket) -> bytes:
    """This rank's bucket as an SGLang ``flattened_bucket`` payload: one flat copy on this GPU, shared by CUDA
    IPC handle (the copy outlives the resharder's reuse of its buffers). Raw pickle bytes: the in-process
    ``Engine.update_weights_from_tensor`` takes them as they are, a base64 string it would only decode again
    (``srt/entrypoints/engine.py:1743-1754``, ``srt/utils/common.py:3109-3119``)."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    monkey_patch_torch_reductions()
    named_tensors = sorted(named_tensors, key=lambda item: -item[1].element_size())  # no misaligned dtype views
    bucket = FlattenedTensorBucket(named_tensors=named_tensors)
    payload = {"flattened_tensor": bucket.get_flattened_tensor(), "metadata": bucket.get_metadata()}
    return MultiprocessingSerializer.serialize(payload)


def _ipc_collect() -> None:
    if torch.cuda.is_available():
        torch.cuda.ipc_collect()


@contextmanager
def _environment_restored() -> Iterator[None]:
    """``os.environ`` as it was before the block, whatever the block wrote into it."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for name in [name for name in os.environ if name not in saved]:
            del os.environ[name]
        os.environ.update(saved)


@contextmanager
def _deadline(seconds: float, message: str) -> Iterator[None]:
    """Raise ``SGLangError(message)`` in the block after ``seconds`` (SIGALRM: ``sglang.Engine()`` installs
    signal handlers, so it must run in the main thread, and waits for its schedulers in 5 s polls,
    ``srt/entrypoints/engine.py:2019-2040``)."""

    def expire(signum, frame):
        raise SGLangError(message)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _check(result: tuple[bool, str], request: str) -> None:
    success, message = result
    if not success:
        raise SGLangError(f"SGLang refused {request}: {message}")


def decode_routed_experts(meta: dict, forwarded: int, route_shape: tuple[int, int]) -> torch.Tensor:
    """``meta_info["routed_experts"]`` as int32 ``[forwarded tokens, layers, top-k]``.

    SGLang 0.5.23 returns, per request asking ``return_routed_experts``, the experts of positions
    ``[routed_experts_start_len, seqlen − 1)`` (start 0: the whole prompt, prefix-cache hits included; the last
    sampled token is never forwarded) as base64 of a flat int32 array, encoded by the tokenizer manager when
    ``skip_tokenizer_init`` bypasses the detokenizer (``srt/managers/scheduler_components/
    batch_result_processor.py:_maybe_collect_routed_experts``, ``srt/managers/tokenizer_manager.py:2602-2609``,
    ``srt/state_capturer/routed_experts.py:extract_routed_experts_from_meta_info``). A server started without
    ``enable_return_routed_experts`` has no capturer and silently returns nothing: refused here.
    """
    encoded = meta.get("routed_experts")
    if encoded is None:
        raise SGLangError(
            "SGLang returned no routed experts (meta_info['routed_experts']): the engine was not started with "
            "enable_return_routed_experts; algorithm.routing_replay=rollout needs it"
        )
    flat = torch.from_numpy(np.frombuffer(base64.b64decode(encoded), dtype=np.int32).copy())
    layers, top_k = route_shape
    if flat.numel() != forwarded * layers * top_k:
        raise SGLangError(
            f"SGLang returned {flat.numel()} routed-expert ids; {forwarded} forwarded tokens × {layers} layers × "
            f"top-{top_k} = {forwarded * layers * top_k} expected"
        )
    return flat.view(forwarded, layers, top_k)


class SGLangRolloutEngine(RolloutEngine):
    """This rank's part of a colocated SGLang engine: the engine itself on the group's first rank."""

    weight_dtype = torch.bfloat16

    def __init__(
        self,
        engine,
        group_ranks: list[int],
        group: dist.ProcessGroup | None = None,
        stop_token_ids: Sequence[int] = (),
        seeded: bool = True,
        serialize: Callable[[Bucket], object] = serialize_flattened_bucket,
        ipc_collect: Callable[[], None] = _ipc_collect,
        idle_timeout_s: float = 600.0,
        route_shape: tuple[int, int] | None = None,
    ) -> None:
        self.engine = engine  # sglang.Engine on the group's first rank, None on its other ranks
        self.group_ranks = group_ranks
        self.group = group
        self.stop_token_ids = list(stop_token_ids)
        self.seeded = seeded
        self.in_flight: dict[asyncio.Task, int] = {}  # group requests by their task on the engine's loop
        self.prompt_lengths: dict[int, int] = {}  # of the groups in flight (the routed experts cover the prompt)
        self.serialize = serialize
        self.ipc_collect = ipc_collect
        self.released: set[str] = set()
        self.weight_version = 0
        self.idle_timeout_s = idle_timeout_s
        self.route_shape = route_shape  # (MoE layers, top-k): every request returns its routed experts

    @classmethod
    def launch(
        cls,
        hf_dir: str,
        group_ranks: list[int],
        group: dist.ProcessGroup | None,
        mem_fraction_static: float,
        seed: int,
        stop_token_ids: Sequence[int],
        seeded: bool = False,
        load_format: str = "dummy",
        *,
        start_timeout_s: float,
        idle_timeout_s: float,
        route_shape: tuple[int, int] | None = None,
    ) -> "SGLangRolloutEngine":
        """Start the group's engine on its GPUs (host rank only; not collective: ``run_on_ranks`` around it
        shares a failure); ``load_format``: ``dummy`` when the weights arrive by sync, ``auto`` to load the
        folder's. ``start_timeout_s``, ``idle_timeout_s``: ``rollout.engine_start_timeout_s``,
        ``rollout.engine_idle_timeout_s``.

        ``route_shape`` (routing replay): ``(MoE layers, top-k)``; the server captures every token's experts
        (``enable_return_routed_experts``) and each request asks for them.

        ``seeded``: per-request ``sampling_seed`` (results independent of the engine count). SGLang honours it
        only in deterministic-inference mode: batch-invariant kernels, its PyTorch sampling backend instead of
        FlashInfer's, Tree-only NCCL all-reduce (``srt/sampling/sampling_batch_info.py:127-171``,
        ``srt/arg_groups/overrides.py:1029-1036``, ``srt/arg_groups/attention_hook.py:599-700``).
        """
        engine = None
        if dist.get_rank() == group_ranks[0]:
            import sglang

            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            timeout = (f"sglang.Engine() did not start within {start_timeout_s:g} s; raise "
                       "rollout.engine_start_timeout_s if the model needs longer to load")
            with _environment_restored(), _deadline(start_timeout_s, timeout):
                engine = sglang.Engine(
                    model_path=hf_dir,
                    tp_size=len(group_ranks),
                    base_gpu_id=local_rank,  # the group's GPUs are this rank's and the next ones
                    nccl_port=ENGINE_NCCL_PORT_BASE + local_rank,
                    dtype="bfloat16",
                    load_format=load_format,
                    enable_memory_saver=True,
                    mem_fraction_static=mem_fraction_static,
                    random_seed=seed,
                    skip_tokenizer_init=True,
                    enable_deterministic_inference=seeded,
                    enable_return_routed_experts=route_shape is not None,
                )
        return cls(engine, group_ranks, group, stop_token_ids, seeded, idle_timeout_s=idle_timeout_s,
                   route_shape=route_shape)

    @property
    def is_host(self) -> bool:
        return self.engine is not None

    # ------------------------------------------------------------------ generation (host)
    def _sampling_params(self, request: GroupRequest, sample: int) -> dict:
        params = {
            "temperature": request.temperature,
            "top_p": request.top_p,
            "top_k": -1,
            "max_new_tokens": request.max_new_tokens,
            "stop_token_ids": self.stop_token_ids,
        }
        if self.seeded:  # one seed per sample, derived from the group's: independent of engine and batch
            params["sampling_seed"] = (request.seed + sample * 0x9E3779B97F4A7C15) % (1 << 63)
        return params

    def submit(self, requests: list[GroupRequest]) -> None:
        """Each group becomes one asynchronous batch request of its n samples on the engine's event loop."""
        for request in requests:
            coroutine = self.engine.async_generate(
                input_ids=[list(request.prompt_ids)] * request.n,
                sampling_params=[self._sampling_params(request, j) for j in range(request.n)],
                return_logprob=True,
                rid=[f"g{request.key:09d}s{j:05d}" for j in range(request.n)],  # fixed width: abort matches by prefix
                **({"return_routed_experts": True} if self.route_shape else {}),
            )
            self.in_flight[self.engine.loop.create_task(coroutine)] = request.key
            self.prompt_lengths[request.key] = len(request.prompt_ids)

    def collect(self) -> dict[int, list[RolloutSample]]:
        """Groups completed so far; waits for the first one if none has."""
        if not self.in_flight:
            return {}
        done, _ = self.engine.loop.run_until_complete(
            asyncio.wait(list(self.in_flight), return_when=asyncio.FIRST_COMPLETED)
        )
        results = {}
        for task in done:
            key = self.in_flight.pop(task)
            prompt_length = self.prompt_lengths.pop(key)
            results[key] = [self._sample(key, output, prompt_length, self.route_shape) for output in task.result()]
        return results

    def abort(self) -> int:
        """Abort every request (they return at once with ``finish_reason`` abort) and drop them."""
        if not self.in_flight:
            return 0
        self.engine.tokenizer_manager.abort_request(abort_all=True)
        self.engine.loop.run_until_complete(asyncio.wait(list(self.in_flight)))
        aborted = len(self.in_flight)
        self.in_flight.clear()
        self.prompt_lengths.clear()
        return aborted

    @staticmethod
    def _sample(key: int, output: dict, prompt_length: int, route_shape: tuple[int, int] | None) -> RolloutSample:
        meta = output["meta_info"]
        reason = meta["finish_reason"]["type"]
        if reason not in ("stop", "length", "abort"):
            raise SGLangError(f"SGLang returned finish_reason {meta['finish_reason']!r}")
        logprobs = [entry[0] for entry in meta["output_token_logprobs"]]
        routes = None
        if route_shape is not None and reason != "abort":
            routes = decode_routed_experts(meta, prompt_length + len(output["output_ids"]) - 1, route_shape)
        return RolloutSample(key, list(output["output_ids"]), logprobs, reason, routes)

    # ------------------------------------------------------------------ weights (every rank of the group)
    def update_weights(self, buckets: Iterable[Bucket]) -> None:
        """Load the streamed buckets: each rank's own copy, one payload per engine TP rank, in one session.

        Collective over the group. The host's outcome (or SGLang's refusal) is shared with the group so that
        no rank frees its copy while the engine reads it, nor waits on a host that failed.
        """
        if self.is_host:
            self.engine.tokenizer_manager.abort_request(abort_all=True)  # no request may see half-updated weights
            _check(self.engine.begin_weight_update(), "begin_weight_update")
        self.weight_version += 1
        for bucket in buckets:
            payload = self.serialize(bucket)  # copied now: the resharder reuses the bucket's memory
            payloads = self._gather(payload)
            outcome = (True, "")
            if self.is_host:
                outcome = self.engine.update_weights_from_tensor(
                    named_tensors=payloads, load_format="flattened_bucket", flush_cache=False
                )
            self._share_outcome(outcome, "update_weights_from_tensor")
            self.ipc_collect()
        if self.is_host:
            _check(self.engine.end_weight_update(), "end_weight_update")
            flushed = self.engine.flush_cache()
            _check((flushed.success, flushed.message), "flush_cache after the weight update")
            self._set_weight_version()

    def _gather(self, payload: object) -> list[object] | None:
        if self.group is None or len(self.group_ranks) == 1:
            return [payload]
        gathered = [None] * len(self.group_ranks) if self.is_host else None
        dist.gather_object(payload, gathered, dst=self.group_ranks[0], group=self.group)
        return gathered

    def _share_outcome(self, outcome: tuple[bool, str], request: str) -> None:
        if self.group is not None and len(self.group_ranks) > 1:
            holder = [outcome]
            dist.broadcast_object_list(holder, src=self.group_ranks[0], group=self.group)
            outcome = holder[0]
        _check(outcome, request)

    def _set_weight_version(self) -> None:
        from sglang.srt.managers.io_struct import UpdateWeightVersionReqInput

        request = UpdateWeightVersionReqInput(new_version=str(self.weight_version))
        self.engine.loop.run_until_complete(self.engine.tokenizer_manager.update_weight_version(request))

    # ------------------------------------------------------------------ colocated memory (host)
    def release_memory(self) -> None:
        """Free weights, KV cache and CUDA graphs; returns once the GPU memory is free."""
        if not self.is_host:
            return
        idle = self.engine.loop.run_until_complete(self.engine.tokenizer_manager.flush_cache(timeout_s=self.idle_timeout_s))
        _check((idle.success, idle.message), "flush_cache before releasing memory")
        tags = [tag for tag in MEMORY_TAGS if tag not in self.released]
        if tags:
            self.engine.release_memory_occupation(tags=tags)
            self.released.update(tags)

    def resume_memory(self, tags: Iterable[str] = MEMORY_TAGS) -> None:
        """Re-acquire the released ones among ``tags`` (the weights before a sync, the rest after it)."""
        if not self.is_host:
            return
        tags = [tag for tag in MEMORY_TAGS if tag in tags and tag in self.released]
        if tags:
            self.engine.resume_memory_occupation(tags=tags)
            self.released.difference_update(tags)

    def state_dict(self) -> dict:
        """The weight version continues across a resume."""
        return {"weight_version": self.weight_version}

    def load_state_dict(self, state: dict) -> None:
        self.weight_version = state.get("weight_version", 0)
