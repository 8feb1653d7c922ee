"""Will it fit? Per-GPU memory of a DAPO job's training and rollout phases, from the configs alone.

Pure arithmetic over the job config and the model's HF config: nothing is allocated and no process group is
created, so ``megatron-dapo plan`` runs on a laptop before a job is queued. Parameters, gradients and optimizer
state follow megatron-core 0.16.1's buffers element for element (the distributed optimizer's padding and
shards included); activations follow what each layer saves for backward. docs/planner.md has every formula,
where it comes from, and what was measured against the real model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from transformers import PretrainedConfig

from megatron_dapo.config import DapoConfig, ModelConfig, ParallelConfig
from megatron_dapo.errors import ConfigError
from megatron_dapo.model_config import has_qk_norm, has_qkv_bias, head_dim, num_experts, padded_vocab_size, validate_hf_config

GIB = 1 << 30
FP32, BF16, INT64 = 4, 2, 8
LayerSpec = Literal["local", "te"]
SGLANG_VOCAB_PADDING = 64  # SGLang pads the vocabulary of its embedding and LM head to a multiple of this


@dataclass(frozen=True)
class ModelDims:
    """The sizes of a Qwen2/Qwen3/Llama HF config that memory depends on (``experts`` > 0: Qwen3-MoE, every
    layer's MLP is a router and ``experts`` SwiGLU experts of ``expert_ffn``; ``ffn`` is then 0)."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    qkv_bias: bool
    tied: bool
    max_positions: int
    qk_norm: bool = False  # Qwen3: RMSNorm of size head_dim on queries and keys (replicated over TP)
    experts: int = 0
    topk: int = 0
    expert_ffn: int = 0

    @classmethod
    def from_hf_config(cls, hf_config: PretrainedConfig) -> "ModelDims":
        moe = num_experts(hf_config) > 0  # validate_hf_config refuses partly dense MoE configs
        return cls(
            layers=hf_config.num_hidden_layers,
            hidden=hf_config.hidden_size,
            ffn=0 if moe else hf_config.intermediate_size,
            heads=hf_config.num_attention_heads,
            kv_heads=hf_config.num_key_value_heads,
            head_dim=head_dim(hf_config),
            vocab=hf_config.vocab_size,
            qkv_bias=has_qkv_bias(hf_config),
            tied=bool(hf_config.tie_word_embeddings),
            max_positions=hf_config.max_position_embeddings,
            qk_norm=has_qk_norm(hf_config),
            experts=num_experts(hf_config),
            topk=hf_config.num_experts_per_tok if moe else 0,
            expert_ffn=hf_config.moe_intermediate_size if moe else 0,
        )

    @property
    def moe(self) -> bool:
        return self.experts > 0

    def layer_parameters(self, tp: int = 1, kv_heads: int | None = None, expert_shards: int = 1) -> int:
        """One decoder layer's parameters on one of ``tp`` ranks (``kv_heads``: KV heads per rank, if replicated;
        ``expert_shards``: ranks the experts' weights are split over, by whole experts or inside each)."""
        q_width = self.heads // tp * self.head_dim
        kv_width = (kv_heads if kv_heads is not None else self.kv_heads // tp) * self.head_dim
        qkv_rows = q_width + 2 * kv_width
        return (
            2 * self.hidden  # input and pre-MLP RMSNorm (replicated over TP)
            + qkv_rows * self.hidden + (qkv_rows if self.qkv_bias else 0)
            + (2 * self.head_dim if self.qk_norm else 0)
            + self.hidden * q_width  # output projection, no bias
            + 3 * self.hidden * (self.ffn // tp)  # SwiGLU gate, up, down
            + self.experts * self.hidden  # router (replicated)
            + self.experts * 3 * self.hidden * self.expert_ffn // expert_shards
        )

    def parameter_count(self) -> int:
        """The Hugging Face model's parameters (unpadded vocabulary; a tied output layer counted once)."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * self.layer_parameters() + self.hidden


@dataclass(frozen=True)
class Cluster:
    """The machines the job would run on: ``nodes × gpus_per_node`` ranks, one per GPU."""

    nodes: int
    gpus_per_node: int
    gpu_memory_gib: float

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def gpu_bytes(self) -> int:
        return int(self.gpu_memory_gib * GIB)


@dataclass(frozen=True)
class PlanOptions:
    """What the job config does not say: the longest prompt, the layer spec of the target hosts, a reserve."""

    max_prompt_length: int = 2048
    layer_spec: LayerSpec = "te"
    reserve_gib: float = 3.0


# ---------------------------------------------------------------- parameters, gradients, optimizer state
@dataclass(frozen=True)
class Param:
    name: str
    numel: int
    shared_embedding: bool = False  # megatron gives it a bucket of its own under the distributed optimizer
    expert: bool = False  # in the expert-parallel buffer, sharded over the expert data-parallel group


@dataclass(frozen=True)
class ExpertLayout:
    """How megatron lays a stage's experts out: ``ep`` ranks share a layer's experts, ``etp`` each expert's
    matrices. ``edp``: the expert data-parallel size, ``world / (etp × ep × pp)``."""

    ep: int = 1
    etp: int = 1
    edp: int = 1


def expert_layout(parallel: ParallelConfig, dp: int) -> ExpertLayout:
    tp = parallel.tensor_model_parallel_size
    ep, etp = parallel.expert_model_parallel_size, parallel.expert_tensor_parallel_size or tp
    return ExpertLayout(ep, etp, dp * tp // (etp * ep))


def chunk_parameters(
    dims: ModelDims, tp: int, pp: int, vpp: int | None, pp_rank: int, vp_stage: int, make_vocab_size_divisible_by: int,
    experts: ExpertLayout = ExpertLayout(),
) -> list[Param]:
    """One rank's parameters of model chunk ``vp_stage``, in ``GPTModel.parameters()`` order (local spec).

    MoE layers (megatron-core 0.16.1 ``MoELayer`` with ``SequentialMLP``): the router ``[E, h]``, then the
    rank's ``E / ep`` local experts, each ``linear_fc1`` and ``linear_fc2`` split over ``etp``. Expert
    weights go to the separate expert buffer only when ``ep > 1``: ``tensor_parallel/layers.py`` sets
    ``allreduce = not (is_expert and expert_model_parallel_size > 1)``, which is what
    ``DistributedDataParallel`` sorts parameters by.
    """
    chunks = vpp or 1
    first, last = pp_rank == 0 and vp_stage == 0, pp_rank == pp - 1 and vp_stage == chunks - 1
    h, heads, groups = dims.hidden, dims.heads // tp, dims.kv_heads // tp
    vocab_rows = padded_vocab_size(dims.vocab, make_vocab_size_divisible_by, tp) // tp
    qkv_rows = (heads + 2 * groups) * dims.head_dim
    expert_ffn, separate = dims.expert_ffn // experts.etp, experts.ep > 1
    params = []
    if first:
        params.append(Param("embedding.word_embeddings.weight", vocab_rows * h, dims.tied and not last))
    for _ in range(dims.layers // (pp * chunks)):
        params += [
            Param("input_layernorm.weight", h),
            Param("self_attention.linear_proj.weight", h * heads * dims.head_dim),
            Param("self_attention.linear_qkv.weight", qkv_rows * h),
            *([Param("self_attention.linear_qkv.bias", qkv_rows)] if dims.qkv_bias else []),
            *([Param("self_attention.q_layernorm.weight", dims.head_dim),
               Param("self_attention.k_layernorm.weight", dims.head_dim)] if dims.qk_norm else []),
            Param("pre_mlp_layernorm.weight", h),
        ]
        if not dims.moe:
            params += [Param("mlp.linear_fc1.weight", 2 * (dims.ffn // tp) * h),
                       Param("mlp.linear_fc2.weight", h * (dims.ffn // tp))]
            continue
        params.append(Param("mlp.router.weight", dims.experts * h))
        for _ in range(dims.experts // experts.ep):
            params += [Param("mlp.experts.local_experts.linear_fc1.weight", 2 * expert_ffn * h, expert=separate),
                       Param("mlp.experts.local_experts.linear_fc2.weight", h * expert_ffn, expert=separate)]
    if last:
        params.append(Param("decoder.final_layernorm.weight", h))
        if not (dims.tied and first):  # tied on one stage: the output layer reuses the embedding
            params.append(Param("output_layer.weight", vocab_rows * h, dims.tied))
    return params


@dataclass(frozen=True)
class BufferLayout:
    """A model chunk's contiguous param/grad buffer: its size and, per DP rank, the parameter elements of the
    rank's shard (what the distributed optimizer keeps state for)."""

    numel: int
    shard_numel: tuple[int, ...]


def buffer_layout(params: list[Param], dp: int, distributed: bool) -> BufferLayout:
    """megatron-core 0.16.1's ``_ParamAndGradBuffer`` layout with one bucket (``overlap_grad_reduce`` off).

    Parameters are laid out in reverse order. Under the distributed optimizer each one starts at a multiple of
    64 elements, a shared embedding gets a bucket of its own, each bucket is padded to a multiple of
    lcm(DP, 128) and split into DP equal shards; padding belongs to no parameter.
    """
    if not params:
        return BufferLayout(0, (0,) * dp)
    if not distributed:
        total = sum(p.numel for p in params)
        return BufferLayout(total, (total,) * dp)
    ranges, buckets, bucket_start, start, in_bucket = [], [], 0, 0, 0

    def close_bucket(end: int) -> int:
        nonlocal bucket_start, in_bucket
        end = math.ceil(end / math.lcm(dp, 128)) * math.lcm(dp, 128)
        buckets.append((bucket_start, end))
        bucket_start, in_bucket = end, 0
        return end

    for param in reversed(params):
        start = math.ceil(start / 64) * 64
        if param.shared_embedding and in_bucket:
            start = close_bucket(start)
        ranges.append((start, start + param.numel))
        in_bucket += 1
        start = close_bucket(start + param.numel) if param.shared_embedding else start + param.numel
    if in_bucket:
        close_bucket(start)
    shards = [0] * dp
    for begin, end in buckets:
        size = (end - begin) // dp
        for rank in range(dp):
            low, high = begin + rank * size, begin + (rank + 1) * size
            shards[rank] += sum(max(0, min(high, p_end) - max(low, p_start)) for p_start, p_end in ranges)
    return BufferLayout(buckets[-1][1], tuple(shards))


@dataclass(frozen=True)
class StateBytes:
    """One rank's lasting training state. ``optimizer`` is the configured one's; both variants are kept for the
    report (``optimizer_replicated``: every DP rank holds all of it; ``optimizer_distributed``: its shard)."""

    params: int
    grads: int
    optimizer: int
    optimizer_replicated: int
    optimizer_distributed: int
    reference: int  # frozen reference model (algorithm.kl_coef > 0)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.reference

    def __add__(self, other: "StateBytes") -> "StateBytes":
        return StateBytes(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


@dataclass(frozen=True)
class StageState:
    """A pipeline stage's state bytes: ``dense[r]`` on data-parallel rank ``r`` (the non-expert buffer),
    ``expert[e]`` on expert data-parallel rank ``e`` (the expert-parallel buffer; all zero without EP)."""

    dense: list[StateBytes]
    expert: list[StateBytes]

    def rank(self, dp_rank: int, expert_dp_rank: int = 0) -> StateBytes:
        return self.dense[dp_rank] + self.expert[expert_dp_rank]

    def largest(self) -> StateBytes:
        """The largest dense shard plus the largest expert shard (one rank holds at most that)."""
        return max(self.dense, key=lambda s: s.total) + max(self.expert, key=lambda s: s.total)


def _buffer_state_bytes(chunks: list[list[Param]], dp: int, model: ModelConfig, distributed: bool, kl: bool) -> list[StateBytes]:
    """Per rank of a ``dp``-sized group, the state of one buffer per model chunk (see ``stage_state_bytes``)."""
    weight_bytes = BF16 if model.bf16 else FP32
    per_element = (FP32 if model.bf16 else 0) + 2 * FP32  # main copy (bf16 only) + exp_avg + exp_avg_sq
    buffer = elements = 0
    shards = [0] * dp
    for chunk in chunks:
        buffer += buffer_layout(chunk, dp, distributed).numel
        elements += sum(p.numel for p in chunk)
        shards = [a + b for a, b in zip(shards, buffer_layout(chunk, dp, True).shard_numel)]
    return [
        StateBytes(
            params=buffer * weight_bytes,
            grads=buffer * FP32,
            optimizer=(shard if distributed else elements) * per_element,
            optimizer_replicated=elements * per_element,
            optimizer_distributed=shard * per_element,
            reference=elements * weight_bytes if kl else 0,
        )
        for shard in shards
    ]


def stage_state_bytes(
    dims: ModelDims, model: ModelConfig, parallel: ParallelConfig, dp: int, pp_rank: int, kl: bool = False
) -> StageState:
    """Bytes of parameters, ``main_grad`` buffers and optimizer state on each rank of pipeline stage ``pp_rank``.

    Gradients are fp32 (``grad_reduce_in_fp32``). Optimizer: Adam's two fp32 moments per parameter element, plus
    fp32 main copies when the weights are bf16; the distributed optimizer keeps them for its shard only and
    holds the weights in a padded buffer too. ``kl``: a frozen reference copy of the weights (no buffers).
    Expert weights (EP > 1) have buffers of their own, padded and sharded over the expert data-parallel group
    (megatron-core 0.16.1 ``distributed_data_parallel.py``: ``expert_parallel_buffers`` on
    ``intra_expt_dp_group``; ``optimizer/__init__.py``: a second optimizer over them).
    """
    par, distributed = parallel, parallel.use_distributed_optimizer
    tp, pp, vpp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.virtual_pipeline_model_parallel_size
    vpp = vpp if vpp and vpp > 1 else None
    experts = expert_layout(par, dp)
    chunks = [chunk_parameters(dims, tp, pp, vpp, pp_rank, vp_stage, model.make_vocab_size_divisible_by, experts)
              for vp_stage in range(vpp or 1)]
    dense = [[p for p in chunk if not p.expert] for chunk in chunks]
    expert = [[p for p in chunk if p.expert] for chunk in chunks]
    return StageState(_buffer_state_bytes(dense, dp, model, distributed, kl),
                      _buffer_state_bytes(expert, experts.edp, model, distributed, kl))


def rank_state_bytes(
    dims: ModelDims, model: ModelConfig, parallel: ParallelConfig, dp: int, pp_rank: int, dp_rank: int, kl: bool = False,
    expert_dp_rank: int = 0,
) -> StateBytes:
    """The state bytes of the rank at (``pp_rank``, ``dp_rank``, ``expert_dp_rank``): TP ranks of a stage, and
    EP/ETP ranks of an expert data-parallel rank, hold the same."""
    return stage_state_bytes(dims, model, parallel, dp, pp_rank, kl).rank(dp_rank, expert_dp_rank)


# ---------------------------------------------------------------- activations
@dataclass(frozen=True)
class ActivationShape:
    """What one micro-batch's activations depend on, besides the model."""

    seq: int
    micro_batch: float  # samples of ``seq`` tokens; a token budget of T tokens: T / seq (full-length samples)
    tp: int
    sequence_parallel: bool
    dtype_bytes: int
    layer_spec: LayerSpec
    recompute: Literal["none", "full", "selective"] = "none"
    expert_tp: int | None = None  # each expert's matrices split over this many ranks (None: tp)

    @property
    def flash(self) -> bool:
        """Transformer Engine keeps flash/fused attention for 16-bit inputs only (docs/pitfalls.md, 26)."""
        return self.layer_spec == "te" and self.dtype_bytes == BF16

    @property
    def tokens(self) -> int:
        return math.ceil(self.seq * self.micro_batch)

    @property
    def sequence_shards(self) -> int:
        """Sequence parallelism splits the norms' tokens (and the saved linear inputs) over TP."""
        return self.tp if self.sequence_parallel and self.tp > 1 else 1


def norm_bytes_per_token(hidden: int, shape: ActivationShape, feeds_linear: bool = True) -> int:
    """An RMSNorm and the saved input of the linear it feeds, per token.

    Local spec (torch RMSNorm, composite): an fp32 copy of the input, the fp32 reciprocal RMS, the fp32
    normalised input, and the output in the activation dtype (saved by the next linear). Transformer Engine's
    fused norm: the input, the reciprocal RMS and its output.
    """
    d = shape.dtype_bytes
    if shape.layer_spec == "local":
        return 2 * FP32 * hidden + FP32 + (d * hidden if feeds_linear else 0)
    return d * hidden + FP32 + (d * hidden if feeds_linear else 0)


def layer_activation_bytes(dims: ModelDims, shape: ActivationShape, recompute: str | None = None) -> int:
    """Bytes one decoder layer saves for backward for one micro-batch (``recompute`` overrides the shape's)."""
    recompute = recompute or shape.recompute
    tokens, d, tp, seq, b = shape.tokens, shape.dtype_bytes, shape.tp, shape.seq, shape.micro_batch
    local_tokens = tokens // shape.sequence_shards
    if recompute == "full":
        return local_tokens * dims.hidden * d  # the layer's input; everything else is recomputed
    heads, groups, hd = dims.heads // tp, dims.kv_heads // tp, dims.head_dim
    q_width, kv_width, qkv_width = heads * hd, groups * hd, (heads + 2 * groups) * hd
    norms = 2 * local_tokens * norm_bytes_per_token(dims.hidden, shape)
    rope = 4 * seq * hd * d  # cos and sin for queries and keys, per position
    context = tokens * q_width * d  # attention output = the output projection's input
    if recompute == "selective":  # the core attention keeps its inputs; v is a view that keeps the QKV output
        core = tokens * d * (q_width + kv_width + qkv_width)
    elif shape.flash:  # q, k after RoPE, v's QKV output, fp32 log-sum-exp
        core = tokens * (d * (q_width + kv_width + qkv_width) + FP32 * heads)
    else:  # unfused: q, k and v repeated to every head (v keeps the QKV output when nothing is repeated),
        # fp32 softmax probabilities plus their 16-bit copy, the causal mask
        v_width = q_width if groups < heads else qkv_width
        probs = b * heads * seq * seq * (FP32 + (d if d != FP32 else 0))
        core = tokens * d * (2 * q_width + v_width) + probs + seq * seq
    qk_norms = qk_norm_bytes(dims, shape, tokens, heads, groups) if dims.qk_norm else 0
    if dims.moe:
        mlp = moe_mlp_bytes(dims, shape, local_tokens)
    else:
        mlp = tokens * d * 5 * (dims.ffn // tp)  # fc1 output (gate|up), up + offset, silu(gate), product
    return math.ceil(norms + rope + core + context + qk_norms + mlp)  # a token budget's micro-batch is fractional


def qk_norm_bytes(dims: ModelDims, shape: ActivationShape, tokens: int, heads: int, groups: int) -> int:
    """Qwen3's per-head RMSNorms of queries and keys (a rank's heads). Local spec: the fp32 copy of the input and
    the fp32 normalised input per element, the fp32 reciprocal RMS per head, and in fp32 the weighted output
    (RoPE keeps it; a 16-bit output is cast first and the cast keeps nothing). Transformer Engine: the input
    and the reciprocal RMS (its fused RoPE keeps nothing)."""
    width = (heads + groups) * dims.head_dim
    d = shape.dtype_bytes
    per_element = 2 * FP32 + (d if d == FP32 else 0) if shape.layer_spec == "local" else d
    return tokens * (width * per_element + FP32 * (heads + groups))


def moe_mlp_bytes(dims: ModelDims, shape: ActivationShape, local_tokens: int) -> int:
    """A MoE layer's router, token dispatcher and experts, for the ``local_tokens`` that reach this rank's router.

    Router (fp32): top-k indices (int64) and probabilities, the routing map (bool) and probabilities of every
    expert, and the dispatcher's sort indices (int64). The dispatcher keeps the permuted tokens (the experts'
    input) and their fp32 probabilities; the expert tensor-parallel group all-gathers its members' tokens, so a
    rank's experts see ``local_tokens × top-k × expert_tp`` tokens, each with ``1 / expert_tp`` of the
    intermediate size. Routing is assumed balanced over the expert-parallel ranks (a skewed router sends more
    tokens to some ranks). Per routed token the local spec's ``SequentialMLP`` keeps six intermediate-sized
    tensors (fc1's output counts two; silu, up, their product, the product scaled by the probability),
    ``TEGroupedMLP`` three (fc1's output, the fused SwiGLU-with-probabilities output).
    """
    d, k, experts = shape.dtype_bytes, dims.topk, dims.experts
    etp = shape.expert_tp or shape.tp
    router = local_tokens * (k * (INT64 + FP32 + INT64) + experts * (1 + FP32))
    routed = local_tokens * k * etp
    per_routed = 6 if shape.layer_spec == "local" else 3
    return router + routed * (dims.hidden * d + FP32) + routed * per_routed * (dims.expert_ffn // etp) * d


def micro_batch_activation_bytes(
    dims: ModelDims, shape: ActivationShape, layers: int, first: bool, last: bool, loss_impl: str
) -> int:
    """What one micro-batch's forward saves for backward on a stage of ``layers`` layers (the loss op excluded).

    First stage: the token ids (the embedding's backward). Last stage: the final norm and the output layer's
    input (``fused_linear`` bypasses the output layer). Full recompute: each layer's input, and the RoPE
    frequencies once (a checkpoint argument).
    """
    total = layers * layer_activation_bytes(dims, shape)
    if shape.recompute == "full":
        total += shape.seq * dims.head_dim * FP32
    if first:
        total += shape.tokens * INT64
    if last:
        local_tokens = shape.tokens // shape.sequence_shards
        total += local_tokens * norm_bytes_per_token(dims.hidden, shape, feeds_linear=loss_impl != "fused_linear")
    return total


def pipeline_tensor_bytes(dims: ModelDims, shape: ActivationShape, first: bool, last: bool) -> int:
    """Per in-flight micro-batch under PP, what the schedule holds beside the saved tensors: the stage's output
    (megatron keeps it: ``deallocate_pipeline_outputs`` is off), and the received input where the first norm
    saved an fp32 copy instead of it (local spec, 16-bit)."""
    one = shape.tokens // shape.sequence_shards * dims.hidden * shape.dtype_bytes
    copied_input = shape.layer_spec == "local" and shape.dtype_bytes != FP32
    return (0 if last else one) + (one if copied_input and not first else 0)


def global_buffer_bytes(dims: ModelDims, shape: ActivationShape) -> int:
    """megatron's persistent ``mpu`` buffer: sequence-parallel all-gathers, and the unfused attention's scores."""
    sizes = [shape.tokens * dims.hidden if shape.sequence_shards > 1 else 0]
    if not shape.flash:
        sizes.append(shape.micro_batch * dims.heads // shape.tp * shape.seq * shape.seq)
    return math.ceil(max(sizes) * shape.dtype_bytes)


def in_flight_micro_batches(pp: int, vpp: int | None, pp_rank: int, num_micro_batches: int) -> int:
    """Model-chunk micro-batches whose activations a pipeline rank holds at once: megatron's warm-up forwards
    plus the first steady-state one (1F1B; interleaved: ``2 (p − r − 1) + (v − 1) p``)."""
    if pp == 1:
        return 1
    chunks = vpp if vpp and vpp > 1 else 1
    total = num_micro_batches * chunks
    if chunks == 1:
        warmup = pp - pp_rank - 1
    else:
        warmup = (pp - pp_rank - 1) * 2 + (chunks - 1) * pp
    return min(warmup + 1, total)


def loss_op_bytes(dims: ModelDims, shape: ActivationShape, model: ModelConfig, temperature: float) -> int:
    """Peak of the loss op's vocabulary-sized buffers for one micro-batch on the last stage.

    ``naive``: the logits shard, then full-vocabulary fp32 tensors (masked logits, log-softmax, and the
    entropy's three temporaries). ``fused``: the logits shard, an fp32 tempered copy (unless the shard is
    already fp32 with nothing to change) and the exponentials. ``fused_linear``: fp32 gradients of the hidden
    states and output weight and their saved copies, plus one chunk's logits, exponentials and gradient.
    """
    tp, d, n, h = shape.tp, shape.dtype_bytes, shape.tokens, dims.hidden
    vocab = padded_vocab_size(dims.vocab, model.make_vocab_size_divisible_by, tp)
    shard = vocab // tp
    if model.loss_impl == "naive":
        return n * shard * d + 5 * n * vocab * FP32
    if model.loss_impl == "fused":
        copied = d != FP32 or temperature != 1.0 or vocab != dims.vocab
        return n * shard * (d + FP32 * (2 if copied else 1))
    chunk = min(model.loss_chunk_size, n)
    return (n * h + shard * h) * (FP32 + d) + chunk * shard * (2 * FP32 + d)


# ---------------------------------------------------------------- rollout (SGLang)
def sglang_weight_bytes(dims: ModelDims, tp: int) -> int:
    """bf16 weights of one SGLang TP rank: vocabulary-parallel embedding and LM head (padded to 64), heads
    split over TP, KV heads replicated when TP exceeds them, norms and routers replicated; MoE experts split over
    the engine's TP ranks (SGLang's default expert layout without an EP size: each expert's matrices over TP)."""
    vocab_rows = math.ceil(math.ceil(dims.vocab / SGLANG_VOCAB_PADDING) * SGLANG_VOCAB_PADDING / tp)
    embeddings = vocab_rows * dims.hidden * (1 if dims.tied else 2)
    layer = dims.layer_parameters(tp, kv_heads=sglang_kv_heads(dims, tp), expert_shards=tp)
    return BF16 * (embeddings + dims.layers * layer + dims.hidden)


def sglang_kv_heads(dims: ModelDims, tp: int) -> int:
    return max(1, dims.kv_heads // tp)


def kv_bytes_per_token(dims: ModelDims, tp: int) -> int:
    """bf16 K and V of every layer for one token, on one GPU of the engine."""
    return 2 * dims.layers * sglang_kv_heads(dims, tp) * dims.head_dim * BF16


# ---------------------------------------------------------------- the plan
@dataclass
class Stage:
    """Training memory of one pipeline stage's ranks (the DP rank with the largest optimizer shard)."""

    pp_rank: int
    state: StateBytes
    in_flight: int
    layers: int
    activations: int
    working: int
    global_buffer: int
    logits: int

    @property
    def peak(self) -> int:
        return self.state.total + self.activations + self.working + self.global_buffer + self.logits


@dataclass
class Plan:
    """Every number of the report, per GPU, in bytes; the phase peaks are derived."""

    config: DapoConfig
    dims: ModelDims
    cluster: Cluster
    options: PlanOptions
    seq: int
    dp: int
    num_micro_batches: int
    shape: ActivationShape
    stages: list[Stage]
    reserve: int
    engine_weights: int = 0
    kv_cache: int = 0
    kv_per_token: int = 0
    sequences_per_engine: int = 0
    actor_during_rollout: int = 0
    sync_buckets: int = 0

    @property
    def rollout_seq(self) -> int:
        """The longest sample the engines generate: the longest prompt plus L_max."""
        return self.options.max_prompt_length + self.config.rollout.max_response_length

    @property
    def train_peak(self) -> int:
        return max(stage.peak for stage in self.stages) + self.reserve

    @property
    def peak_stage(self) -> Stage:
        return max(self.stages, key=lambda stage: stage.peak)

    @property
    def generate_peak(self) -> int:
        return self.engine_weights + self.kv_cache + self.actor_during_rollout + self.reserve

    @property
    def sync_peak(self) -> int:
        return max(stage.state.total for stage in self.stages) + self.engine_weights + self.sync_buckets + self.reserve

    @property
    def rollout_peak(self) -> int:
        return max(self.generate_peak, self.sync_peak)

    @property
    def sglang(self) -> bool:
        return self.config.rollout.engine == "sglang"

    @property
    def fits(self) -> bool:
        limit = self.cluster.gpu_bytes
        enough_kv = not self.sglang or self.sequences_per_engine >= 1
        return self.train_peak <= limit and self.rollout_peak <= limit and enough_kv


def check_layout(
    config: DapoConfig, dims: ModelDims, hf_config: PretrainedConfig, cluster: Cluster, max_prompt_length: int
) -> None:
    """Refuse layouts that do not divide, naming the knob: the job config's own rules, heads and FFN vs TP,
    layers vs PP, heads and KV heads vs the rollout TP, the sequence vs the model's context."""
    for name, value in (("--nodes", cluster.nodes), ("--gpus-per-node", cluster.gpus_per_node)):
        if value < 1:
            raise ConfigError(f"{name}={value} must be at least 1")
    if not cluster.gpu_memory_gib > 0:
        raise ConfigError(f"--gpu-memory-gib={cluster.gpu_memory_gib} must be > 0 (an H800 has 80)")
    config.validate(cluster.world_size, cluster.gpus_per_node)
    par = config.parallel
    validate_hf_config(hf_config, par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                       par.virtual_pipeline_model_parallel_size if (par.virtual_pipeline_model_parallel_size or 1) > 1 else None,
                       par.expert_model_parallel_size, par.expert_tensor_parallel_size)
    tp = par.tensor_model_parallel_size
    if dims.ffn % tp:
        raise ConfigError(f"parallel.tensor_model_parallel_size={tp} must divide intermediate_size={dims.ffn} of the model config")
    rollout_tp = config.rollout.ranks_per_engine
    if config.rollout.engine == "sglang" and (
        dims.heads % rollout_tp or (dims.kv_heads % rollout_tp and rollout_tp % dims.kv_heads)
    ):
        raise ConfigError(
            f"rollout.ranks_per_engine={rollout_tp} (SGLang's TP) must divide num_attention_heads={dims.heads} and "
            f"divide or be a multiple of num_key_value_heads={dims.kv_heads}; e.g. {math.gcd(dims.heads, dims.kv_heads)}"
        )
    if max_prompt_length < 1:
        raise ConfigError(f"--max-prompt-length={max_prompt_length} must be at least 1")
    seq = max_prompt_length + config.rollout.max_response_length
    if seq > dims.max_positions:
        raise ConfigError(
            f"rollout.max_response_length={config.rollout.max_response_length} + --max-prompt-length="
            f"{max_prompt_length} = {seq} tokens exceeds max_position_embeddings={dims.max_positions} of the model "
            "config; lower either"
        )


def plan_memory(config: DapoConfig, hf_config: PretrainedConfig, cluster: Cluster, options: PlanOptions = PlanOptions()) -> Plan:
    """Every number of the report; raises ``ConfigError`` when the layout does not divide."""
    dims = ModelDims.from_hf_config(hf_config)
    if options.reserve_gib < 0:
        raise ConfigError(f"--reserve-gib={options.reserve_gib} must be >= 0")
    par, model = config.parallel, config.model
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    vpp = par.virtual_pipeline_model_parallel_size if (par.virtual_pipeline_model_parallel_size or 1) > 1 else None
    seq = options.max_prompt_length + config.rollout.max_response_length
    check_layout(config, dims, hf_config, cluster, options.max_prompt_length)
    dp = cluster.world_size // (tp * pp)
    if par.sequence_parallel and tp > 1:
        seq = math.ceil(seq / tp) * tp  # micro-batches are cut to a multiple of TP under sequence parallelism
    budget, local_samples = par.max_tokens_per_micro_batch, config.algorithm.mini_batch_size // dp
    # a token budget's largest micro-batch: the budget's tokens (attention's s² terms at full-length samples, the
    # worst case for that many tokens), or one full-length sample when that exceeds the budget
    micro_batch = max(1.0, budget / seq) if budget else par.micro_batch_size
    shape = ActivationShape(
        seq, micro_batch, tp, par.sequence_parallel, BF16 if model.bf16 else FP32, options.layer_spec,
        par.recompute_granularity, par.expert_tensor_parallel_size,
    )
    samples_per_micro_batch = max(1, budget // seq) if budget else par.micro_batch_size
    num_micro_batches = math.ceil(local_samples / samples_per_micro_batch)
    chunks = vpp or 1
    chunk_layers = dims.layers // (pp * chunks)
    kl = config.algorithm.kl_coef > 0
    stages = []
    for pp_rank in sorted({0, pp - 1}):
        first, last = pp_rank == 0, pp_rank == pp - 1
        state = stage_state_bytes(dims, model, par, dp, pp_rank, kl).largest()
        in_flight = in_flight_micro_batches(pp, vpp, pp_rank, num_micro_batches)
        body = micro_batch_activation_bytes(dims, shape, chunk_layers, False, False, model.loss_impl)
        ends = micro_batch_activation_bytes(dims, shape, chunk_layers, first, last, model.loss_impl) - body
        if pp > 1:
            body += pipeline_tensor_bytes(dims, shape, first, last)
        # interleaved: the first (last) model chunk is one in v of the chunk micro-batches in flight
        activations = in_flight * body + math.ceil(in_flight / chunks) * ends
        full_layer = layer_activation_bytes(dims, shape, recompute="none")
        working = full_layer * (2 if par.recompute_granularity == "full" else 1)
        logits = loss_op_bytes(dims, shape, model, config.rollout.temperature) if last else 0
        stages.append(Stage(pp_rank, state, in_flight, chunk_layers * chunks, activations, working,
                            global_buffer_bytes(dims, shape), logits))
    plan = Plan(config, dims, cluster, options, seq, dp, num_micro_batches, shape, stages,
                reserve=int(options.reserve_gib * GIB))
    static = max(stage.state.total for stage in stages)
    offloaded = model.offload_during_rollout
    plan.actor_during_rollout = 0 if offloaded else static
    if plan.sglang:
        rollout_tp = config.rollout.ranks_per_engine
        plan.engine_weights = sglang_weight_bytes(dims, rollout_tp)
        plan.kv_cache = max(0, int(config.rollout.sglang_mem_fraction * cluster.gpu_bytes) - plan.engine_weights)
        plan.kv_per_token = kv_bytes_per_token(dims, rollout_tp)
        plan.sequences_per_engine = plan.kv_cache // (plan.kv_per_token * plan.rollout_seq)
        plan.sync_buckets = 2 * config.rollout.weight_sync_bucket_mb * (1 << 20)
    return plan


def refusal(plan: Plan) -> ConfigError | None:
    """Why the plan does not fit, as one line naming the biggest consumer and the knob that reduces it."""
    cfg, limit, gib = plan.config, plan.cluster.gpu_memory_gib, _gib
    par, model = cfg.parallel, cfg.model
    if plan.train_peak > plan.cluster.gpu_bytes:
        stage = plan.peak_stage
        consumers = {
            "activations": stage.activations, "logits buffers": stage.logits, "optimizer states": stage.state.optimizer,
            "gradients": stage.state.grads, "parameters": stage.state.params, "backward working set": stage.working,
        }
        biggest = max(consumers, key=consumers.get)
        return ConfigError(
            f"training needs {gib(plan.train_peak)} GiB per GPU (pipeline stage {stage.pp_rank}) > --gpu-memory-gib "
            f"{limit:g}; biggest consumer: {biggest} {gib(consumers[biggest])} GiB: {_train_knob(biggest, plan)}"
        )
    if plan.sglang and plan.kv_cache == 0:
        return ConfigError(
            f"SGLang's weights ({gib(plan.engine_weights)} GiB per GPU) exceed rollout.sglang_mem_fraction="
            f"{cfg.rollout.sglang_mem_fraction} of the GPU: raise rollout.ranks_per_engine or rollout.sglang_mem_fraction"
        )
    if plan.sglang and plan.sequences_per_engine < 1:
        return ConfigError(
            f"SGLang's KV cache ({gib(plan.kv_cache)} GiB per GPU) holds no full-length sequence of {plan.rollout_seq} tokens: "
            f"raise rollout.sglang_mem_fraction or rollout.ranks_per_engine, or lower rollout.max_response_length"
        )
    if plan.generate_peak > plan.cluster.gpu_bytes:
        if not model.offload_during_rollout:
            knob = f"set model.offload_during_rollout=true (the actor keeps {gib(plan.actor_during_rollout)} GiB)"
        else:
            knob = "lower rollout.sglang_mem_fraction"
        return ConfigError(f"generation needs {gib(plan.generate_peak)} GiB per GPU > --gpu-memory-gib {limit:g}: {knob}")
    if plan.sync_peak > plan.cluster.gpu_bytes:
        knob = ("set parallel.use_distributed_optimizer=true" if not par.use_distributed_optimizer
                else "raise rollout.ranks_per_engine or parallel.tensor_model_parallel_size, or lower rollout.weight_sync_bucket_mb")
        return ConfigError(
            f"the weight sync needs {gib(plan.sync_peak)} GiB per GPU (actor state + engine weights + buckets) > "
            f"--gpu-memory-gib {limit:g}: {knob}"
        )
    return None


def _train_knob(consumer: str, plan: Plan) -> str:
    par, model, tp = plan.config.parallel, plan.config.model, plan.config.parallel.tensor_model_parallel_size
    more_parallel = "raise parallel.tensor_model_parallel_size or parallel.pipeline_model_parallel_size"
    if consumer == "activations":
        if par.recompute_granularity != "full":
            return "set parallel.recompute_granularity=full"
        if par.max_tokens_per_micro_batch > plan.seq:
            return "lower parallel.max_tokens_per_micro_batch"
        if par.micro_batch_size > 1 and not par.max_tokens_per_micro_batch:
            return "lower parallel.micro_batch_size"
        if tp > 1 and not par.sequence_parallel:
            return "set parallel.sequence_parallel=true"
        return f"{more_parallel}, or lower rollout.max_response_length"
    if consumer == "logits buffers":
        if model.loss_impl != "fused_linear":
            return "set model.loss_impl=fused_linear"
        return "lower parallel.micro_batch_size or model.loss_chunk_size, or raise parallel.tensor_model_parallel_size"
    if consumer == "optimizer states" and not par.use_distributed_optimizer:
        return "set parallel.use_distributed_optimizer=true"
    if consumer == "backward working set" and tp > 1 and not par.sequence_parallel:
        return "set parallel.sequence_parallel=true"
    return more_parallel


# ---------------------------------------------------------------- the report
def _gib(value: int) -> str:
    return f"{value / GIB:.2f}"


def format_report(plan: Plan) -> str:
    """The per-GPU table of both phases; the last line is ``plan: fits=<yes|no> params=<N> train_peak_gib=<x>
    rollout_peak_gib=<y>``."""
    cfg, dims, par, model, shape = plan.config, plan.dims, plan.config.parallel, plan.config.model, plan.shape
    cluster, stages = plan.cluster, plan.stages
    vpp = par.virtual_pipeline_model_parallel_size
    layout = [f"TP {par.tensor_model_parallel_size} × PP {par.pipeline_model_parallel_size}"
              + (f" (× {vpp} virtual)" if vpp and vpp > 1 else "") + f" × DP {plan.dp}"]
    if par.sequence_parallel and par.tensor_model_parallel_size > 1:
        layout.append("sequence parallel")
    layout.append("distributed optimizer" if par.use_distributed_optimizer else "replicated optimizer")
    attention = "flash attention" if shape.flash else "unfused attention, scores saved"
    budget = par.max_tokens_per_micro_batch
    layout += [f"micro-batch {budget} tokens" if budget else f"micro-batch {par.micro_batch_size}",
               f"recompute {par.recompute_granularity}"]
    lines = [
        f"model: {dims.parameter_count():,} parameters, {dims.layers} layers, hidden {dims.hidden}, FFN {dims.ffn}, "
        f"{dims.heads} heads / {dims.kv_heads} KV, vocabulary {dims.vocab}{' (tied)' if dims.tied else ''}",
        f"cluster: {cluster.nodes} nodes × {cluster.gpus_per_node} GPUs, {cluster.gpu_memory_gib:g} GiB each",
        "layout: " + ", ".join(layout),
        f"actor: {shape.layer_spec} layer spec ({attention}), {'bf16' if model.bf16 else 'fp32'} weights and activations",
        f"sequence: {plan.options.max_prompt_length} prompt + {cfg.rollout.max_response_length} response tokens "
        f"(→ {plan.seq}); {plan.num_micro_batches} micro-batches per optimiser step and DP rank",
        "",
    ]
    headers = [f"stage {s.pp_rank}" for s in stages] if len(stages) > 1 else ["all ranks"]
    width = 64

    def row(label: str, values: list[str | int]) -> str:
        cells = "".join(f"{v if isinstance(v, str) else _gib(v):>11}" for v in values)
        return f"  {label:<{width}}{cells}"

    weight = "bf16" if model.bf16 else "fp32"
    configured = {True: " (configured)", False: " (alternative)"}
    lines.append(f"{'training, per GPU [GiB]':<{width + 2}}" + "".join(f"{h:>11}" for h in headers))
    lines.append(row(f"parameters ({weight})", [s.state.params for s in stages]))
    lines.append(row("gradients (fp32 main_grad buffers)", [s.state.grads for s in stages]))
    lines.append(row("optimizer states with the distributed optimizer" + configured[par.use_distributed_optimizer],
                     [s.state.optimizer_distributed for s in stages]))
    lines.append(row("optimizer states without it" + configured[not par.use_distributed_optimizer],
                     [s.state.optimizer_replicated for s in stages]))
    if any(s.state.reference for s in stages):
        lines.append(row("reference model (algorithm.kl_coef > 0)", [s.state.reference for s in stages]))
    lines.append(row(f"activations (recompute {par.recompute_granularity}), all micro-batches in flight",
                     [s.activations for s in stages]))
    lines.append(row("  micro-batches in flight (pipeline schedule)", [str(s.in_flight) for s in stages]))
    lines.append(row("backward working set (one layer" + (", recomputed)" if par.recompute_granularity == "full" else ")"),
                     [s.working for s in stages]))
    if any(s.global_buffer for s in stages):
        lines.append(row("megatron global buffer (SP all-gather / attention scores)", [s.global_buffer for s in stages]))
    lines.append(row(f"loss op logits buffers (model.loss_impl={model.loss_impl})", [s.logits for s in stages]))
    lines.append(row("runtime reserve (CUDA context, NCCL, fragmentation)", [plan.reserve for _ in stages]))
    lines.append(row("training peak", [s.peak + plan.reserve for s in stages]))
    lines.append("")
    if plan.sglang:
        ro = cfg.rollout
        engines = cluster.world_size // ro.ranks_per_engine
        lines.append(f"rollout, per GPU [GiB]: SGLang, TP {ro.ranks_per_engine} per engine, {engines} engines, "
                     f"mem_fraction_static {ro.sglang_mem_fraction}")
        lines.append(row("engine weights (bf16)", [plan.engine_weights]))
        lines.append(row("KV cache (mem_fraction × GPU − weights)", [plan.kv_cache]))
        lines.append(f"    {plan.kv_per_token // 1024} KiB per token → {plan.kv_cache // plan.kv_per_token:,} tokens = "
                     f"{plan.sequences_per_engine} full-length sequences of {plan.rollout_seq} tokens at once per engine "
                     f"({plan.sequences_per_engine * engines} in the job)")
    else:
        lines.append("rollout, per GPU [GiB]: transformers engine in the trainer process (host memory, no GPU memory)")
    offload = model.offload_during_rollout
    lines.append(row(f"actor kept while generating (model.offload_during_rollout={str(offload).lower()})",
                     [plan.actor_during_rollout]))
    lines.append(row("runtime reserve", [plan.reserve]))
    lines.append(row("generation peak", [plan.generate_peak]))
    lines.append(row("weight sync peak (actor state + engine weights + 2 buckets)", [plan.sync_peak]))
    lines.append(f"    left for SGLang's activations and CUDA graphs while generating: "
                 f"{_gib(max(0, cluster.gpu_bytes - plan.generate_peak))} GiB" if plan.sglang else
                 "    the engine keeps nothing on the GPU")
    if plan.sglang:
        lines.append("  engine kept during training: nothing (weights, KV cache and CUDA graphs released)")
    lines.append(
        f"plan: fits={'yes' if plan.fits else 'no'} params={dims.parameter_count()} "
        f"train_peak_gib={plan.train_peak / GIB:.1f} rollout_peak_gib={plan.rollout_peak / GIB:.1f}"
    )
    return "\n".join(lines)
