"""Colocated SGLang rollout engine (GPU only) behind ``RolloutEngine``.

Written against SGLang 0.5.23's offline ``sglang.Engine``. It has
not run here: SGLang needs CUDA. Its call sequence is tested against a labelled fake engine
(tests/unit/test_sglang_engine.py).

Colocation: the engine shares the trainer's GPUs. Before training, ``release_memory`` frees its weights,
KV cache and CUDA graphs (``enable_memory_saver``) and waits until the memory is really free (docs/pitfalls.md, 16);
before a weight sync ``resume_memory`` brings back the weights only; ``update_weights`` streams buckets as
flattened per-dtype tensors shared by CUDA IPC, flushes the KV/prefix cache with the last bucket only
(docs/pitfalls.md, 14), aborts in-flight requests first, runs ``torch.cuda.ipc_collect`` after each bucket and never
reuses a send buffer (docs/pitfalls.md, 15), then brings back the KV cache and CUDA graphs.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import torch

from megatron_dapo.rollout.base import RolloutEngine
from megatron_dapo.samples import RolloutSample
from megatron_dapo.weights.transfer import Bucket

MEMORY_TAGS_AFTER_SYNC = ["kv_cache", "cuda_graph"]


def serialize_flattened_bucket(named_tensors: Bucket) -> str:
    """One dtype's tensors as an SGLang ``flattened_bucket`` payload (CUDA IPC handles, not bytes)."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    bucket = FlattenedTensorBucket(named_tensors=named_tensors)
    payload = {"flattened_tensor": bucket.get_flattened_tensor(), "metadata": bucket.get_metadata()}
    return MultiprocessingSerializer.serialize(payload, output_str=True)


def _ipc_collect() -> None:
    if torch.cuda.is_available():
        torch.cuda.ipc_collect()


def _by_dtype(bucket: Bucket) -> list[Bucket]:
    groups: dict[torch.dtype, Bucket] = {}
    for name, tensor in bucket:
        groups.setdefault(tensor.dtype, []).append((name, tensor))
    return list(groups.values())


class SGLangRolloutEngine(RolloutEngine):
    """``RolloutEngine`` over an SGLang offline engine colocated with the trainer."""

    weight_dtype = torch.bfloat16

    def __init__(
        self,
        engine,
        tp_size: int,
        serialize: Callable[[Bucket], object] = serialize_flattened_bucket,
        ipc_collect: Callable[[], None] = _ipc_collect,
        release_timeout_s: float = 60.0,
    ) -> None:
        self.engine = engine
        self.tp_size = tp_size
        self.serialize = serialize
        self.ipc_collect = ipc_collect
        self.release_timeout_s = release_timeout_s
        self.weight_version = 0

    @classmethod
    def launch(cls, hf_dir: str, tp_size: int, mem_fraction_static: float, seed: int) -> "SGLangRolloutEngine":
        """Start the offline engine on this node's GPUs with memory saving on (weights stay in bf16)."""
        import sglang

        engine = sglang.Engine(
            model_path=hf_dir,
            tp_size=tp_size,
            dtype="bfloat16",
            enable_memory_saver=True,
            mem_fraction_static=mem_fraction_static,
            random_seed=seed,
            skip_tokenizer_init=True,
        )
        return cls(engine, tp_size)

    def generate(
        self, prompt_token_ids: list[list[int]], n: int, temperature: float, top_p: float, max_new_tokens: int
    ) -> list[RolloutSample]:
        input_ids = [list(prompt) for prompt in prompt_token_ids for _ in range(n)]  # prompt-major
        sampling_params = {"temperature": temperature, "top_p": top_p, "top_k": -1, "max_new_tokens": max_new_tokens}
        outputs = self.engine.generate(input_ids=input_ids, sampling_params=sampling_params, return_logprob=True)
        samples = []
        for row, output in enumerate(outputs):
            meta = output["meta_info"]
            logprobs = [entry[0] for entry in meta["output_token_logprobs"]]
            reason = "stop" if meta["finish_reason"]["type"] == "stop" else "length"
            samples.append(RolloutSample(row // n, list(output["output_ids"]), logprobs, reason))
        return samples

    def update_weights(self, buckets: Iterable[Bucket]) -> None:
        """Send each bucket as one flattened payload per dtype; the cache is flushed with the last one.

        A bucket is serialised (copied into fresh flat buffers) before the next one is requested — the
        resharder may reuse a bucket's memory once it advances — and sent once the next bucket shows
        whether it was the last.
        """
        self.engine.tokenizer_manager.abort_request(abort_all=True)  # no request may see half-updated weights
        self.weight_version += 1
        pending = None
        for bucket in buckets:
            payloads = [self.serialize(group) for group in _by_dtype(bucket)]
            if pending is not None:
                self._send(pending, last=False)
            pending = payloads
        if pending is not None:
            self._send(pending, last=True)
        self.engine.resume_memory_occupation(tags=MEMORY_TAGS_AFTER_SYNC)

    def _send(self, payloads: list, last: bool) -> None:
        for index, payload in enumerate(payloads):
            self.engine.update_weights_from_tensor(
                named_tensors=[payload] * self.tp_size,
                load_format="flattened_bucket",
                flush_cache=last and index == len(payloads) - 1,
            )
        self.ipc_collect()

    def release_memory(self) -> None:
        free_before = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None
        self.engine.release_memory_occupation()
        if free_before is not None:
            self._wait_until_freed(free_before)

    def _wait_until_freed(self, free_before: int) -> None:
        """Return once this GPU's free memory has grown (the engine's release is asynchronous)."""
        deadline = time.monotonic() + self.release_timeout_s
        while torch.cuda.mem_get_info()[0] <= free_before:
            if time.monotonic() > deadline:
                raise RuntimeError(f"SGLang released memory but none was freed within {self.release_timeout_s} s")
            time.sleep(0.05)

    def resume_memory(self) -> None:
        self.engine.resume_memory_occupation(tags=["weights"])  # KV cache and graphs come back after the sync
