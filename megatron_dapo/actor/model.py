"""Build a megatron-core ``GPTModel`` (this rank's pipeline stage) from a Hugging Face Qwen2/Llama/Qwen3(-MoE) config."""

from __future__ import annotations

import dataclasses
import functools
import sys

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from transformers import PretrainedConfig

from megatron_dapo.errors import ConfigError
from megatron_dapo.model_config import (
    check_routing_replay,
    has_qk_norm,
    has_qkv_bias,
    head_dim,
    num_experts,
    padded_vocab_size,
    rope_theta,
    validate_hf_config,
)


@functools.cache
def transformer_engine_unavailable_reason() -> str | None:
    """Why Transformer Engine's PyTorch layers cannot be used here; ``None`` when they can.

    ``import transformer_engine`` succeeds even when its PyTorch extension failed to load (a build against
    another torch, a missing ``.so``): transformer-engine 2.11.0's ``transformer_engine/__init__.py`` swallows
    that ``ImportError``. Importing ``transformer_engine.pytorch`` raises it, so that is what is checked. On a
    CUDA host the reason is printed once: a silent fall-back to the local spec is slow (O(s²) attention) and
    looks like a working install.
    """
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError) as exc:  # OSError: FileNotFoundError "Could not find shared object file"
        reason = f"{type(exc).__name__}: {exc}"
        print(
            f"megatron-dapo: Transformer Engine is not usable ({reason}); using megatron-core's local layer spec. "
            "Install it as the README's 'The GPU path' says (torch first, then TE without build isolation).",
            file=sys.stderr,
        )
        return reason
    return None


def transformer_engine_available() -> bool:
    """True when CUDA is present and Transformer Engine's PyTorch layers import (the GPU layer spec can be used)."""
    return transformer_engine_unavailable_reason() is None


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm for the local spec whose weight is tagged for sequence parallelism.

    megatron-core's ``WrappedTorchNorm`` refuses sequence parallelism; the tag is all it needs:
    ``finalize_model_grads`` all-reduces tagged norm gradients over the TP group. Also used for Qwen3's q/k
    norms under sequence parallelism (their inputs are heads, not sequence shards; ``finalize_model_grads``
    reduces them once, by name, whether tagged or not).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: object) -> None:
        super().__init__(hidden_size, eps=eps)
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)


def _define_te_gemm_fallback() -> None:
    """megatron-core 0.16.1's ``moe/moe_utils.py`` imports ``te_general_gemm`` only when Transformer Engine imports,
    yet ``RouterGatingLinearFunction`` reads the name unconditionally (``if te_general_gemm is not None``): without
    TE every MoE router forward raises ``NameError``. ``None`` is the value its own check expects for "no TE"."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def layer_spec(config: TransformerConfig, vp_stage: int | None = None) -> ModuleSpec | TransformerBlockSubmodules:
    """Transformer Engine's layer spec on GPU, megatron-core's local spec otherwise.

    Under sequence parallelism the local spec's norms (per layer and final) are ``SequenceParallelRMSNorm``.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    moe = {"num_experts": config.num_moe_experts, "qk_layernorm": config.qk_layernorm}
    if config.num_moe_experts:
        _define_te_gemm_fallback()
    if transformer_engine_available():  # MoE: TE's grouped GEMM experts
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(moe_grouped_gemm=config.moe_grouped_gemm, **moe)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm", **moe)  # MoE: SequentialMLP experts
    if not config.sequence_parallel:
        return spec
    norm = ModuleSpec(module=SequenceParallelRMSNorm)
    attention = spec.submodules.self_attention
    if config.qk_layernorm:
        attention = dataclasses.replace(
            attention, submodules=dataclasses.replace(attention.submodules, q_layernorm=norm, k_layernorm=norm)
        )
    layer = dataclasses.replace(
        spec,
        submodules=dataclasses.replace(
            spec.submodules, input_layernorm=norm, pre_mlp_layernorm=norm, self_attention=attention
        ),
    )
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage), layer_norm=norm)


def transformer_config_from_hf(
    hf_config: PretrainedConfig,
    tp_size: int,
    pp_size: int,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    vpp_size: int | None = None,
    recompute_granularity: str = "none",
    ep_size: int = 1,
    etp_size: int | None = None,
    moe_aux_loss_coef: float = 0.0,
    routing_replay: bool = False,
) -> TransformerConfig:
    """megatron-core ``TransformerConfig`` equivalent to a Qwen2/Llama/Qwen3/Qwen3-MoE HF config, with per-token
    loss on.

    Micro-batches may differ in length (padding-aware micro-batching): with PP their shapes are exchanged;
    the interleaved schedule needs one shape for all of them. ``recompute_granularity`` (``parallel.*``):
    ``full`` checkpoints every layer on its own (it keeps only its input), ``selective`` megatron's core
    attention (the part that grows with the square of the sequence); docs/planner.md has what each saves.
    """
    vpp_size = vpp_size if vpp_size and vpp_size > 1 else None
    validate_hf_config(hf_config, tp_size, pp_size, vpp_size, ep_size, etp_size)
    check_routing_replay(hf_config, routing_replay)
    on_gpu = torch.cuda.is_available()
    _refuse_unbuildable_moe_layout(hf_config, tp_size, sequence_parallel, ep_size, etp_size, on_gpu)
    recompute = {
        "none": {},
        "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
        "selective": {"recompute_granularity": "selective"},
    }[recompute_granularity]
    return TransformerConfig(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=head_dim(hf_config),
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        add_bias_linear=False,
        add_qkv_bias=has_qkv_bias(hf_config),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=not on_gpu,
        bf16=params_dtype == torch.bfloat16,  # bf16 weights and activations; main params and grads stay fp32
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=pp_size,
        virtual_pipeline_model_parallel_size=vpp_size,
        calculate_per_token_loss=True,
        sequence_parallel=sequence_parallel and tp_size > 1,
        variable_seq_lengths=pp_size > 1 and vpp_size is None,  # interleaving: one width for all micro-batches
        qk_layernorm=has_qk_norm(hf_config),
        **_moe_fields(hf_config, ep_size, etp_size, moe_aux_loss_coef, routing_replay, on_gpu),
        moe_token_dispatcher_type="alltoall",  # megatron refuses its default ("allgather") with variable lengths
        # gloo: batched isend/irecv pairs up wrongly in the interleaved steady state (wrong activations,
        # measured); single ops are ordered. NCCL keeps megatron's default.
        batch_p2p_comm=on_gpu,
        **recompute,
    )


def _refuse_unbuildable_moe_layout(
    hf_config: PretrainedConfig, tp_size: int, sequence_parallel: bool, ep_size: int, etp_size: int | None, on_gpu: bool
) -> None:
    """MoE layouts megatron-core 0.16.1 builds but cannot train here, refused before any work: TP without sequence
    parallelism (``moe_layer.py`` raises in the first training forward), and, on gloo, experts split over ETP
    under EP (the all-to-all dispatcher all-gathers token sets of different sizes over ETP; gloo's all-gather
    needs equal ones)."""
    if not num_experts(hf_config):
        return
    if tp_size > 1 and not sequence_parallel:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size={tp_size} with a MoE model needs parallel.sequence_parallel=true "
            "(megatron-core refuses to train MoE layers under TP without it)"
        )
    if not on_gpu and ep_size > 1 and (etp_size or tp_size) > 1:
        raise ConfigError(
            f"parallel.expert_tensor_parallel_size={etp_size or tp_size} with parallel.expert_model_parallel_size="
            f"{ep_size} needs NCCL (GPUs); on CPU set parallel.expert_tensor_parallel_size=1"
        )


def _moe_fields(
    hf_config: PretrainedConfig, ep_size: int, etp_size: int | None, aux_loss_coef: float, routing_replay: bool, on_gpu: bool
) -> dict[str, object]:
    """Qwen3-MoE's router as megatron expresses it (megatron/core/transformer/moe/moe_utils.py,
    ``topk_routing_with_score_function``): HF takes the top-k of softmax(logits) and, with ``norm_topk_prob``,
    renormalises them, which is a softmax over the top-k logits (``moe_router_pre_softmax=False``); without it
    the weights are the full softmax's (``True``). The router runs in fp32 (``moe_router_dtype``), as SGLang's
    does, so that bf16 rounding does not change which experts are chosen. Routing replay needs the unfused
    top-k: the fused one bypasses the replay hook."""
    experts = num_experts(hf_config)
    if not experts:
        return {}
    return {
        "num_moe_experts": experts,
        "moe_router_topk": hf_config.num_experts_per_tok,
        "moe_ffn_hidden_size": hf_config.moe_intermediate_size,
        "moe_router_score_function": "softmax",
        "moe_router_pre_softmax": not hf_config.norm_topk_prob,
        "moe_router_dtype": "fp32",
        "moe_router_load_balancing_type": "aux_loss" if aux_loss_coef > 0 else "none",
        "moe_aux_loss_coeff": aux_loss_coef,
        "moe_router_fusion": False,
        "moe_permute_fusion": False,
        "moe_grouped_gemm": on_gpu,
        "moe_enable_routing_replay": routing_replay,
        "expert_model_parallel_size": ep_size,
        "expert_tensor_parallel_size": etp_size,  # None: megatron makes it TP
    }


def build_gpt_model(
    hf_config: PretrainedConfig, config: TransformerConfig, make_vocab_size_divisible_by: int, vp_stage: int | None = None
) -> GPTModel:
    """This rank's ``GPTModel`` stage (model chunk ``vp_stage`` under interleaving); RoPE base and tied
    embeddings come from the HF config."""
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config, vp_stage),
        vocab_size=padded_vocab_size(hf_config.vocab_size, make_vocab_size_divisible_by, tp_size),
        max_sequence_length=hf_config.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
        position_embedding_type="rope",
        rotary_base=rope_theta(hf_config),
        vp_stage=vp_stage,
    )
