"""The Megatron actor: a TP/PP/DP-sharded ``GPTModel`` that computes log-probs and takes DAPO optimiser steps.

Batches are dicts of ``[batch, seq]`` tensors in *label coordinates*: position t holds the token predicted
at t (``labels``), its mask (``loss_mask``: response tokens to train on), ``old_logprobs``, ``advantages``
and optionally ``rollout_is_weights`` and ``ref_logprobs``. Each rank passes its data-parallel replica's
share (``batch.data_parallel_partition``); the ranks of one replica pass the same one.

Loss normalisation follows Megatron's per-token contract: each micro-batch's loss function returns
``(loss_numerator, count, metrics)``; Megatron sums numerators' gradients over micro-batches and DP ranks and
``finalize_model_grads`` divides by the step's total count (docs/design.md, "Loss normalisation").

The actor is given only its own config sections: model, parallel layout, optimizer and the policy loss.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import ContextManager, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from transformers import AutoConfig

from megatron_dapo.actor.host_offload import HostOffload, lasting_tensors
from megatron_dapo.actor.routing import MoeRouting
from megatron_dapo.actor.model import build_gpt_model, transformer_config_from_hf, transformer_engine_available
from megatron_dapo.algorithm import PolicyLossConfig
from megatron_dapo.batch import padding_aware_micro_batches, unsort_rows
from megatron_dapo.checkpointing import load_checkpoint, save_checkpoint
from megatron_dapo.config import ModelConfig, OptimizerConfig, ParallelConfig
from megatron_dapo.errors import ConfigError
from megatron_dapo.model_config import ModelLayout
from megatron_dapo.ops import fused_linear_logprobs_entropy, naive_logprobs_entropy, vocab_parallel_logprobs_entropy
from megatron_dapo.ops.dapo_loss import (
    METRIC_SUM_KEYS,
    dapo_loss_terms,
    fused_linear_dapo_loss_terms,
    step_loss_metrics,
)
from megatron_dapo.weights.transfer import check_finite_weights, load_hf_checkpoint, unwrap

Batch = dict[str, torch.Tensor]
OFFLOAD_TAG = "megatron_dapo_actor"


@contextmanager
def _output_layer_bypassed(gpt: torch.nn.Module) -> Iterator[None]:
    """Make ``GPTModel`` return its final hidden states ``[b, s, h]`` instead of logits (fused-linear loss).

    Under sequence parallelism the hidden states are gathered over the sequence as the output layer would;
    the gather's backward only splits, because the fused-linear op already all-reduces ``grad_hidden``.
    """
    output_layer = gpt.output_layer
    if gpt.config.sequence_parallel:
        def bypass(hidden_states, weight=None, runtime_gather_output=None):
            return gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False), None
    else:
        def bypass(hidden_states, weight=None, runtime_gather_output=None):
            return hidden_states, None
    output_layer.forward = bypass
    try:
        yield
    finally:
        del output_layer.forward


def metric_sums(outputs: list[dict[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """The micro-batches' loss metric sums (``METRIC_SUM_KEYS``) added up, float64 ``[len(METRIC_SUM_KEYS)]`` on
    ``device`` (the collectives that reduce it run on the device's backend)."""
    sums = torch.zeros(len(METRIC_SUM_KEYS), dtype=torch.float64, device=device)
    for output in outputs:
        sums += torch.stack([output[k].double() for k in METRIC_SUM_KEYS])
    return sums


class MegatronActor:
    """Policy model under megatron-core: forward-only log-probs and token-level DAPO updates."""

    def __init__(
        self,
        hf_dir: str,
        model: ModelConfig,
        parallel: ParallelConfig,
        optimizer: OptimizerConfig,
        loss: PolicyLossConfig,
        total_steps: int,
        moe_aux_loss_coef: float = 0.0,
        routing_replay: bool = False,
    ) -> None:
        """Build this rank's model chunks from ``model.megatron_checkpoint`` or ``hf_dir``'s weights, the
        optimizer and its LR schedule over ``total_steps`` optimiser steps; a frozen reference copy when the
        loss has a KL term. MoE: the router's load-balancing loss coefficient, and whether forwards replay the
        engine's routes (``algorithm.routing_replay``)."""
        self.model_options, self.parallel, self.loss = model, parallel, loss
        # Where the model and its inputs live: this rank's GPU, or the CPU (megatron's CPU layer).
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        par = parallel
        self.hf_config = AutoConfig.from_pretrained(hf_dir)
        self.layout = ModelLayout.from_hf_config(self.hf_config)
        self.params_dtype = params_dtype = torch.bfloat16 if model.bf16 else torch.float32
        self.transformer_config = transformer_config_from_hf(
            self.hf_config,
            par.tensor_model_parallel_size,
            par.pipeline_model_parallel_size,
            params_dtype=params_dtype,
            sequence_parallel=par.sequence_parallel,
            vpp_size=par.virtual_pipeline_model_parallel_size,
            recompute_granularity=par.recompute_granularity,
            ep_size=par.expert_model_parallel_size,
            etp_size=par.expert_tensor_parallel_size,
            moe_aux_loss_coef=moe_aux_loss_coef,
            routing_replay=routing_replay,
        )
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=par.use_distributed_optimizer
        )
        self.offloadable = model.offload_during_rollout
        self.offloaded = False
        # GPU: torch_memory_saver; CPU: its emulation, so that the toy fails on a read of offloaded memory
        self._host_offload = HostOffload() if model.offload_during_rollout and self.device.type == "cpu" else None
        with self._offloadable_memory():
            # One chunk, or one per virtual pipeline stage; only the first chunk's gradients are bucketed.
            self.model_chunks = [
                DistributedDataParallel(
                    config=self.transformer_config, ddp_config=ddp_config, module=chunk, disable_bucketing=index > 0
                )
                for index, chunk in enumerate(self._build_and_load(hf_dir))
            ]
            self.optimizer = get_megatron_optimizer(
                MegatronOptimizerConfig(
                    optimizer="adam",
                    lr=optimizer.lr,
                    min_lr=optimizer.min_lr,
                    weight_decay=optimizer.weight_decay,
                    adam_beta1=optimizer.adam_beta1,
                    adam_beta2=optimizer.adam_beta2,
                    adam_eps=optimizer.adam_eps,
                    clip_grad=optimizer.clip_grad,
                    # bf16: fp32 main params and Adam state beside the bf16 weights (gradients reduce in fp32)
                    bf16=model.bf16,
                    params_dtype=params_dtype,
                    use_distributed_optimizer=par.use_distributed_optimizer,
                ),
                self.model_chunks,
            )
            self.ref_chunks = [c.eval() for c in self._build_and_load(hf_dir)] if loss.kl_coef > 0 else None
        if routing_replay and par.recompute_granularity == "full":
            raise ConfigError(
                "algorithm.routing_replay=rollout with parallel.recompute_granularity=full: the recomputed forward "
                "would route on its own; use recompute_granularity none or selective"
            )
        self.routing = (
            MoeRouting(self.model_chunks, self.layout.num_experts, self.hf_config.num_experts_per_tok, routing_replay)
            if self.layout.num_experts else None
        )
        self.routing_metrics: dict[str, float] = {}  # of the last π_old forward (moe/*)
        self.transformer_config.finalize_model_grads_func = finalize_model_grads
        no_sync = [chunk.no_sync for chunk in self.model_chunks]
        self.transformer_config.no_sync_func = no_sync if len(no_sync) > 1 else no_sync[0]
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if optimizer.lr_warmup_steps > 0 else optimizer.lr,
            max_lr=optimizer.lr,
            min_lr=optimizer.min_lr,
            lr_warmup_steps=optimizer.lr_warmup_steps,
            lr_decay_steps=max(total_steps, optimizer.lr_warmup_steps + 1),
            lr_decay_style="constant",
            start_wd=optimizer.weight_decay,
            end_wd=optimizer.weight_decay,
            wd_incr_steps=max(total_steps, 1),
            wd_incr_style="constant",
        )

    # ------------------------------------------------------------------ memory while engines generate
    def _offloadable_memory(self) -> ContextManager:
        """Where the actor's lasting tensors are allocated: a torch_memory_saver region (GPU, with
        ``model.offload_during_rollout``) that ``offload`` releases, or ordinary memory.

        torch_memory_saver is what SGLang itself uses (an sglang 0.5.23 dependency); megatron-core 0.16.1
        selects its ``torch`` hook mode on import (``megatron/core/inference/contexts/dynamic_context.py:61-67``).
        Tensors in a region cannot be shared by CUDA IPC; the weight sync's buckets are allocated outside it.
        """
        if not self.offloadable or self._host_offload is not None:
            return nullcontext()
        from torch_memory_saver import torch_memory_saver

        return torch_memory_saver.region(tag=OFFLOAD_TAG, enable_cpu_backup=True)

    def offload(self) -> None:
        """Release the GPU memory of weights, gradients and optimizer state (kept in host memory) so that the
        colocated engines' KV cache can use it (docs/pitfalls.md, 25); on a CPU host, make them unreadable
        (``host_offload.py``). A no-op unless offloadable. Nothing may read them until ``onload``."""
        if not self.offloadable:
            return
        if self._host_offload is not None:
            chunks = self.model_chunks + (self.ref_chunks or [])
            self._host_offload.pause(lasting_tensors(chunks, self.optimizer))
        else:
            from torch_memory_saver import torch_memory_saver

            torch_memory_saver.pause(OFFLOAD_TAG)
        self.offloaded = True

    def onload(self) -> None:
        """Bring back what ``offload`` released, before the next forward pass or any other read."""
        if not self.offloaded:
            return
        if self._host_offload is not None:
            self._host_offload.resume()
        else:
            from torch_memory_saver import torch_memory_saver

            torch_memory_saver.resume(OFFLOAD_TAG)
        self.offloaded = False

    def require_onloaded(self, reader: str) -> None:
        """Every reader of the actor's weights, gradients or optimizer state calls this first: offloaded memory
        is unmapped on a GPU and a read of it an illegal address (docs/pitfalls.md, 35)."""
        if self.offloaded:
            raise RuntimeError(
                f"{reader} would read the actor's offloaded memory: onload it first (docs/pitfalls.md, 35)"
            )

    def _build_and_load(self, hf_dir: str) -> list[torch.nn.Module]:
        """This rank's model chunks, filled from ``model.megatron_checkpoint`` when set, else from the HF weights."""
        vpp = self.transformer_config.virtual_pipeline_model_parallel_size
        stages = range(vpp) if vpp else [None]
        divisible_by = self.model_options.make_vocab_size_divisible_by
        chunks = [build_gpt_model(self.hf_config, self.transformer_config, divisible_by, vp_stage) for vp_stage in stages]
        for param in (p for chunk in chunks for p in chunk.parameters()):
            # The local spec's torch norms ignore params_dtype; TE's follow it. Parameters only: buffers such
            # as RoPE frequencies stay fp32 (what megatron's Float16Module would also cast).
            param.data = param.data.to(self.params_dtype)
        source = self.model_options.megatron_checkpoint
        if source:
            load_checkpoint(chunks, self.hf_config, source)
        else:
            load_hf_checkpoint(chunks, hf_dir, self.layout)
        check_finite_weights(chunks, self.layout, source or hf_dir)
        return chunks

    def save_checkpoint(self, save_dir: str | Path, step: int, trainer_state: dict, tokenizer) -> Path:
        """Save model, optimizer, LR scheduler and ``trainer_state`` as ``save_dir/iter_<step>`` (collective)."""
        self.require_onloaded("the checkpoint save")
        return save_checkpoint(
            self.model_chunks, self.optimizer, self.scheduler, self.hf_config, save_dir, step, trainer_state, tokenizer
        )

    def load_checkpoint(self, path: str | Path) -> dict | None:
        """Resume model, optimizer and LR scheduler from a checkpoint (any layout); the saved trainer state."""
        self.require_onloaded("the checkpoint load")
        if self.parallel.use_distributed_optimizer and not transformer_engine_available():
            raise ConfigError(
                f"cannot resume {path} with parallel.use_distributed_optimizer=true here: megatron-core 0.16.1's "
                "torch-AdamW fallback (no Transformer Engine/Apex) cannot load distributed-optimizer state; "
                "resume on a GPU host, or set trainer.resume=false to start over"
            )
        state = load_checkpoint(self.model_chunks, self.hf_config, path, self.optimizer, self.scheduler)
        check_finite_weights(self.model_chunks, self.layout, str(path))
        return state

    # ------------------------------------------------------------------ forward and per-token log-probs
    def _forward(self, model: torch.nn.Module, micro_batch: Batch) -> torch.Tensor:
        """Logits shard ``[b, s, V/TP]`` — or, for ``fused_linear`` on the last stage, hidden states ``[b, s, h]``."""
        input_ids = micro_batch["input_ids"]
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        gpt = unwrap(model)
        bypass = self.model_options.loss_impl == "fused_linear" and gpt.post_process
        with _output_layer_bypassed(gpt) if bypass else nullcontext():
            return model(input_ids, position_ids, None)

    def _output_weight(self, model: torch.nn.Module) -> torch.Tensor:
        gpt = unwrap(model)
        return gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else gpt.output_layer.weight

    def _token_logprobs(
        self, model: torch.nn.Module, output: torch.Tensor, labels: torch.Tensor, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token ``(logprob, entropy)`` with the configured ``model.loss_impl``."""
        tp_group = parallel_state.get_tensor_model_parallel_group()
        vocab_size = self.layout.vocab_size
        impl = self.model_options.loss_impl
        if impl == "fused_linear":
            return fused_linear_logprobs_entropy(
                output, self._output_weight(model), labels, vocab_size, temperature, tp_group,
                self.model_options.loss_chunk_size,
            )
        if impl == "fused":
            return vocab_parallel_logprobs_entropy(output, labels, vocab_size, temperature, tp_group)
        return naive_logprobs_entropy(output, labels, vocab_size, temperature, tp_group)

    def _logprob_loss_func(self, model: torch.nn.Module, micro_batch: Batch, output: torch.Tensor, temperature: float):
        logprobs, entropy = self._token_logprobs(model, output, micro_batch["labels"], temperature)
        zero = logprobs.sum() * 0.0
        return zero, micro_batch["loss_mask"].sum().int(), {"logprobs": logprobs.detach(), "entropy": entropy.detach()}

    # ------------------------------------------------------------------ schedule
    def _micro_batches(self, batch: Batch) -> tuple[list[Batch], torch.Tensor]:
        """The padding-aware micro-batches of this rank's share (see ``padding_aware_micro_batches``) and their order.

        The interleaved schedule needs one shape for all micro-batches: they share the longest one's width.
        """
        multiple = parallel_state.get_tensor_model_parallel_world_size() if self.transformer_config.sequence_parallel else 1
        uniform = len(self.model_chunks) > 1
        return padding_aware_micro_batches(
            batch, self.parallel.micro_batch_size, multiple, uniform, max_tokens=self.parallel.max_tokens_per_micro_batch
        )

    def _run_schedule(self, chunks: list[torch.nn.Module], micro: list[Batch], loss_func, forward_only: bool) -> list[dict]:
        """Megatron's forward/backward schedule (1F1B under PP, interleaved with model chunks) over ``micro``;
        the last stage's loss outputs."""

        routing = self.routing if chunks is self.model_chunks else None  # the reference model routes on its own

        def forward_step(data_iterator: Iterator[Batch], model_chunk: torch.nn.Module):
            micro_batch = next(data_iterator)
            if routing is not None:
                routing.before_forward(model_chunk, micro_batch)
            output = self._forward(model_chunk, micro_batch)
            if routing is not None:
                routing.after_forward(model_chunk, micro_batch)
            return output, partial(loss_func, model_chunk, micro_batch)

        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(micro) for _ in chunks] if len(chunks) > 1 else iter(micro),
            model=chunks,
            num_microbatches=len(micro),
            seq_length=max(m["input_ids"].shape[1] for m in micro),
            micro_batch_size=max(m["input_ids"].shape[0] for m in micro),  # shapes vary: PP sends them first
            forward_only=forward_only,
        )

    # ------------------------------------------------------------------ forward-only log-probs
    @torch.no_grad()
    def compute_logprobs(
        self, batch: Batch, temperature: float, use_reference: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logprobs, entropy)`` ``[batch, seq]`` of ``batch['labels']`` for this rank's share, on every rank of
        its pipeline.

        Positions after a sample's last ``loss_mask`` token are 0 (they are cut from its micro-batch).
        """
        self.require_onloaded("compute_logprobs")
        chunks = self.ref_chunks if use_reference else self.model_chunks
        for chunk in chunks:
            chunk.eval()
        micro, order = self._micro_batches({k: batch[k] for k in ("input_ids", "labels", "loss_mask", "routed_experts") if k in batch})
        if self.routing is not None and not use_reference:
            self.routing.begin(collect_stats=True, device=batch["input_ids"].device)
        outputs = self._run_schedule(chunks, micro, partial(self._logprob_loss_func, temperature=temperature), True)
        if self.routing is not None and not use_reference:
            self.routing_metrics = self.routing.end()
        width = batch["input_ids"].shape[1]
        shape = (len(order), width)
        if parallel_state.is_pipeline_last_stage():
            logprobs = unsort_rows([o["logprobs"] for o in outputs], order, width)
            entropy = unsort_rows([o["entropy"] for o in outputs], order, width)
        else:
            device = batch["input_ids"].device  # the receive buffers of the broadcast below
            logprobs, entropy = torch.empty(shape, device=device), torch.empty(shape, device=device)
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        last_pp_rank = parallel_state.get_pipeline_model_parallel_last_rank()
        for tensor in (logprobs, entropy):
            dist.broadcast(tensor, src=last_pp_rank, group=pp_group)
        return logprobs, entropy

    # ------------------------------------------------------------------ training
    def _policy_loss_func(self, model: torch.nn.Module, micro_batch: Batch, output: torch.Tensor):
        if self.model_options.loss_impl == "fused_linear":
            numerator, count, sums = fused_linear_dapo_loss_terms(
                output, self._output_weight(model), micro_batch, self.loss, self.layout.vocab_size,
                parallel_state.get_tensor_model_parallel_group(), self.model_options.loss_chunk_size,
            )
        else:
            logprobs, _ = self._token_logprobs(model, output, micro_batch["labels"], self.loss.temperature)
            numerator, count, sums = dapo_loss_terms(logprobs, micro_batch, self.loss)
        return numerator, count.int(), sums

    def forward_backward(self, batch: Batch) -> dict[str, float]:
        """Gradients of the step's DAPO loss over ``batch`` into ``param.main_grad`` (no optimiser step).

        Each data-parallel replica passes its share of the mini-batch. Megatron sums per-micro-batch numerators
        over micro-batches and DP ranks and ``finalize_model_grads`` divides by the step's token count: the
        gradient is the whole mini-batch's whatever the layout or micro-batch split. Returns the step's loss
        metric sums over all replicas.
        """
        self.require_onloaded("forward_backward")
        for chunk in self.model_chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        micro, _ = self._micro_batches(batch)
        if self.routing is not None:
            self.routing.begin(collect_stats=False, device=batch["input_ids"].device)
        outputs = self._run_schedule(self.model_chunks, micro, self._policy_loss_func, False)
        if self.routing is not None:
            self.routing.end()
        sums = metric_sums(outputs if parallel_state.is_pipeline_last_stage() else [], batch["input_ids"].device)
        # Sum over DP ranks (and bring the last stage's values to every rank of the pipeline).
        dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        dist.broadcast(
            sums,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
        return dict(zip(METRIC_SUM_KEYS, sums.tolist()))

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One optimiser step over a mini-batch (each data-parallel replica passes its share)."""
        total = self.forward_backward(batch)
        with self._offloadable_memory():  # Adam state created lazily on the first step lands in the region
            _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        return {
            **step_loss_metrics(total),
            "actor/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "actor/lr": self.optimizer.param_groups[0]["lr"],
        }
