"""MoE routing in the actor: rollout routing replay and the routing metrics.

Replay (``algorithm.routing_replay: rollout``): before each micro-batch's forward through a model chunk, each of
the chunk's routers gets the engine's experts for the tokens it will see, through megatron-core 0.16.1's
``RouterReplay`` (``transformer/moe/router_replay.py``: ``REPLAY_FORWARD`` takes the given indices and gathers
the router's own scores at them, so the gate weights and their gradients stay the actor's). megatron's hidden
states are ``[seq, batch, hidden]``, so a router's token ``s·B + b`` is position ``s`` of row ``b``; under
sequence parallelism a TP rank's router sees only its sequence shard.

Metrics (from the π_old forward, replay on or off), over the step's response tokens that the engine forwarded
(every response token but the last): ``moe/routing_agreement``, the share of (token, layer) whose top-k set of
the actor's own router equals the engine's; ``moe/expert_load_max_over_mean``, tokens per expert, max over mean,
averaged over layers; ``moe/aux_loss``, megatron's switch load-balancing loss without its coefficient
(``moe_utils.switch_load_balancing_loss_func``: E / (k·T²) · Σ_e (Σ_t p_te) · count_e), averaged over layers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.router_replay import RouterReplayAction

from megatron_dapo.weights.transfer import unwrap

Batch = dict[str, torch.Tensor]


def forwarded_response_tokens(loss_mask: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` bool: response tokens the engine forwarded. Label ``t`` is token ``t+1``, so token ``t`` is a
    response token when ``loss_mask[t-1]`` is set, and was forwarded when another response token follows it."""
    shifted = torch.zeros_like(loss_mask, dtype=torch.bool)
    shifted[:, 1:] = loss_mask[:, :-1] > 0
    return shifted & (loss_mask > 0)


class MoeRouting:
    """The routers of this rank's model chunks, their replay targets and their statistics for one forward pass."""

    def __init__(self, chunks: list[torch.nn.Module], num_experts: int, top_k: int, replay: bool) -> None:
        self.num_experts, self.top_k, self.replay = num_experts, top_k, replay
        self.chunk_of = {id(chunk): index for index, chunk in enumerate(chunks)}
        self.routers = [
            [(layer.layer_number - 1, layer.mlp.router) for layer in unwrap(chunk).decoder.layers]
            for chunk in chunks
        ]
        self.num_layers = unwrap(chunks[0]).config.num_layers
        self.logits: dict[int, torch.Tensor] = {}
        for chunk_routers in self.routers:
            for _, router in chunk_routers:
                router.gating = self._recording(router.gating, id(router))
        self.stats: torch.Tensor | None = None
        self.with_engine_routes = False
        self.sequence_parallel = unwrap(chunks[0]).config.sequence_parallel

    def _recording(self, gating, key: int):
        def gating_and_record(input: torch.Tensor) -> torch.Tensor:
            logits = gating(input)
            self.logits[key] = logits.detach()
            return logits
        return gating_and_record

    def _shard(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sequence-first ``[s, b, ...]`` → this rank's tokens ``[s_local·b, ...]``."""
        if self.sequence_parallel:
            tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
            length = tensor.shape[0] // tp
            tensor = tensor[rank * length : (rank + 1) * length]
        return tensor.reshape(-1, *tensor.shape[2:])

    # ------------------------------------------------------------------ a forward pass
    def begin(self, collect_stats: bool, device: torch.device) -> None:
        """Start a pass over micro-batches; ``collect_stats`` for the π_old forward."""
        self.stats = torch.zeros(self.num_layers, 2 * self.num_experts + 3, dtype=torch.float64, device=device) if collect_stats else None
        self.with_engine_routes = False

    def before_forward(self, chunk: torch.nn.Module, micro_batch: Batch) -> None:
        """Replay: give the chunk's routers the engine's experts of this micro-batch's tokens."""
        if not (self.replay and "routed_experts" in micro_batch):
            return
        routes = micro_batch["routed_experts"].transpose(0, 1)  # [s, b, layers, k]
        for layer, router in self.routers[self.chunk_of[id(chunk)]]:
            indices = self._shard(routes[:, :, layer]).long()
            # positions padded past the batch width (zeros) get experts 0…k−1: valid, and never trained
            repeated = (indices == indices[:, :1]).all(-1) if self.top_k > 1 else torch.zeros_like(indices[:, 0], dtype=torch.bool)
            indices[repeated] = torch.arange(self.top_k, device=indices.device)
            router.router_replay.set_target_indices(indices)
            router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)

    def after_forward(self, chunk: torch.nn.Module, micro_batch: Batch) -> None:
        """Add this micro-batch's routing statistics of the chunk's layers (π_old forward only)."""
        if self.stats is None:
            return
        mask = self._shard(forwarded_response_tokens(micro_batch["loss_mask"]).transpose(0, 1))
        engine = micro_batch.get("routed_experts")
        if engine is not None:
            engine = self._shard(engine.transpose(0, 1))[mask]  # [tokens, layers, k]
            self.with_engine_routes = True
        for layer, router in self.routers[self.chunk_of[id(chunk)]]:
            logits = self.logits.pop(id(router)).reshape(-1, self.num_experts)[mask].float()
            own = logits.topk(self.top_k, dim=-1).indices
            used = engine[:, layer].long() if engine is not None and self.replay else own
            counts = torch.zeros(self.num_experts, dtype=torch.float64, device=logits.device)
            counts.index_add_(0, used.reshape(-1), torch.ones(used.numel(), dtype=torch.float64, device=logits.device))
            row = self.stats[layer]
            row[: self.num_experts] += counts
            row[self.num_experts : 2 * self.num_experts] += torch.softmax(logits, dim=-1).sum(0).double()
            row[-3] += logits.shape[0]
            if engine is not None:
                same = (own.sort(-1).values == engine[:, layer].long().sort(-1).values).all(-1)
                row[-2] += same.sum()
                row[-1] += same.numel()

    def end(self) -> dict[str, float]:
        """Clear the replay targets; the pass's metrics (collective over DP, the sequence shards and PP)."""
        for chunk_routers in self.routers:
            for _, router in chunk_routers:
                if router.router_replay is not None:
                    router.router_replay.clear_indices()
                    router.router_replay.clear_router_replay_action()
        self.logits.clear()
        if self.stats is None:
            return {}
        stats, self.stats = self.stats, None
        dist.all_reduce(stats, group=parallel_state.get_data_parallel_group())
        if self.sequence_parallel:
            dist.all_reduce(stats, group=parallel_state.get_tensor_model_parallel_group())
        dist.all_reduce(stats, group=parallel_state.get_pipeline_model_parallel_group())  # each stage: its layers
        counts, probs = stats[:, : self.num_experts], stats[:, self.num_experts : 2 * self.num_experts]
        tokens = stats[:, -3].clamp_min(1)
        metrics = {
            "moe/expert_load_max_over_mean": (counts.max(1).values / counts.mean(1).clamp_min(1e-12)).mean().item(),
            "moe/aux_loss": (self.num_experts / (self.top_k * tokens**2) * (probs * counts).sum(1)).mean().item(),
        }
        if self.with_engine_routes:
            metrics["moe/routing_agreement"] = (stats[:, -2].sum() / stats[:, -1].sum().clamp_min(1)).item()
        return metrics
