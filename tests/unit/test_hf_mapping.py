"""Megatron ⇄ HF layouts (docs/pitfalls.md, 7–10) against layouts built by explicit loops."""

import pytest
import torch

from megatron_dapo.errors import CheckpointMismatchError
from megatron_dapo.model_config import ModelLayout
from megatron_dapo.weights.hf_mapping import (
    DictReader,
    hf_to_megatron,
    megatron_to_hf,
    param_mapping,
)

# 8 query heads, 2 KV groups, head_dim 3, hidden 5
LAYOUT = ModelLayout(num_attention_heads=8, num_key_value_heads=2, head_dim=3, vocab_size=11, tie_word_embeddings=False)


def _shard(mapping, tensors, tp_rank, tp_size, padded_rows=None, reader_cls=DictReader):
    reader = reader_cls(dict(zip(mapping.hf_names, tensors)))
    return hf_to_megatron(mapping, reader, LAYOUT, tp_rank, tp_size, padded_rows)


class RecordingReader(DictReader):
    """Records the slices asked for (the importer must read only its TP shard's rows/columns)."""

    reads: list = []

    def read(self, name, dim=0, start=0, stop=None):
        RecordingReader.reads.append((name, dim, start, stop))
        return super().read(name, dim, start, stop)


def _qkv_tensors(trailing=(5,)):
    q = torch.arange(8 * 3 * (trailing[0] if trailing else 1), dtype=torch.float32).reshape(8 * 3, *trailing)
    k = 1000 + torch.arange(2 * 3 * (trailing[0] if trailing else 1), dtype=torch.float32).reshape(2 * 3, *trailing)
    v = 2000 + torch.arange(2 * 3 * (trailing[0] if trailing else 1), dtype=torch.float32).reshape(2 * 3, *trailing)
    return q, k, v


def _expected_qkv(q, k, v):
    """[q heads of group 0, k_0, v_0, q heads of group 1, k_1, v_1] built head by head."""
    rows = []
    for group in range(2):
        for head in range(4 * group, 4 * group + 4):
            rows.append(q[head * 3 : head * 3 + 3])
        rows.append(k[group * 3 : group * 3 + 3])
        rows.append(v[group * 3 : group * 3 + 3])
    return torch.cat(rows)


@pytest.mark.parametrize("suffix, trailing", [("weight", (5,)), ("bias", ())])
def test_qkv_per_group_interleave_and_tp_shards(suffix, trailing):
    q, k, v = _qkv_tensors(trailing)
    mapping = param_mapping(f"decoder.layers.0.self_attention.linear_qkv.{suffix}", 3, LAYOUT)
    assert mapping.hf_names[0] == f"model.layers.3.self_attn.q_proj.{suffix}"
    full = _shard(mapping, [q, k, v], 0, 1)
    expected = _expected_qkv(q, k, v)
    assert torch.equal(full, expected)
    shards = [_shard(mapping, [q, k, v], r, 2) for r in range(2)]
    assert torch.equal(shards[0], expected[: len(expected) // 2])  # TP rank 0 owns KV group 0 whole
    for got, want in zip(megatron_to_hf(mapping, shards, LAYOUT), (q, k, v)):
        assert torch.equal(got, want)


def test_gate_up_shards_are_gate_then_up_per_rank():
    gate, up = torch.arange(24.0).reshape(8, 3), 100 + torch.arange(24.0).reshape(8, 3)
    mapping = param_mapping("decoder.layers.1.mlp.linear_fc1.weight", 1, LAYOUT)
    shards = [_shard(mapping, [gate, up], r, 2) for r in range(2)]
    assert torch.equal(shards[1], torch.cat([gate[4:], up[4:]]))
    got_gate, got_up = megatron_to_hf(mapping, shards, LAYOUT)
    assert torch.equal(got_gate, gate) and torch.equal(got_up, up)


def test_vocab_padding_added_and_stripped():
    embed = torch.randn(11, 5)
    mapping = param_mapping("embedding.word_embeddings.weight", None, LAYOUT)
    shards = [_shard(mapping, [embed], r, 2, padded_rows=16) for r in range(2)]
    assert shards[0].shape == (8, 5) and torch.equal(shards[1][3:], torch.zeros(5, 5))
    assert torch.equal(megatron_to_hf(mapping, shards, LAYOUT)[0], embed)


@pytest.mark.parametrize("name, dim", [("decoder.layers.0.self_attention.linear_proj.weight", 1), ("decoder.layers.0.mlp.linear_fc2.weight", 1)])
def test_row_parallel_split_by_columns(name, dim):
    weight = torch.randn(5, 8)
    mapping = param_mapping(name, 0, LAYOUT)
    shards = [_shard(mapping, [weight], r, 2) for r in range(2)]
    assert torch.equal(shards[0], weight[:, :4])
    assert torch.equal(megatron_to_hf(mapping, shards, LAYOUT)[0], weight)


def test_tied_output_layer_maps_to_embedding_and_both_layer_specs_are_known():
    tied = ModelLayout(8, 2, 3, 11, tie_word_embeddings=True)
    assert param_mapping("output_layer.weight", None, tied).hf_names == ("model.embed_tokens.weight",)
    assert param_mapping("output_layer.weight", None, LAYOUT).hf_names == ("lm_head.weight",)
    local = param_mapping("decoder.layers.2.input_layernorm.weight", 2, LAYOUT)
    te = param_mapping("decoder.layers.2.self_attention.linear_qkv.layer_norm_weight", 2, LAYOUT)
    assert local.hf_names == te.hf_names == ("model.layers.2.input_layernorm.weight",)
    with pytest.raises(KeyError, match="no Hugging Face mapping"):
        param_mapping("decoder.layers.0.mlp.shared_experts.linear_fc1.weight", 0, LAYOUT)


def test_expert_names_of_both_specs_map_to_the_global_hf_expert():
    """The local spec's SequentialMLP and TE's TEGroupedMLP name local expert 1 differently; on EP rank 1 of a
    layout with 4 local experts it is HF expert 5."""
    local = param_mapping("decoder.layers.3.mlp.experts.local_experts.1.linear_fc1.weight", 3, LAYOUT, expert_offset=4)
    grouped = param_mapping("decoder.layers.3.mlp.experts.linear_fc1.weight1", 3, LAYOUT, expert_offset=4)
    expected = ("model.layers.3.mlp.experts.5.gate_proj.weight", "model.layers.3.mlp.experts.5.up_proj.weight")
    assert local.hf_names == grouped.hf_names == expected
    assert local.kind == "gate_up" and local.expert == 5
    down = param_mapping("decoder.layers.3.mlp.experts.linear_fc2.weight0", 3, LAYOUT, expert_offset=4)
    assert (down.kind, down.hf_names) == ("row", ("model.layers.3.mlp.experts.4.down_proj.weight",))
    router = param_mapping("decoder.layers.3.mlp.router.weight", 3, LAYOUT)
    assert (router.kind, router.hf_names, router.expert) == ("replicated", ("model.layers.3.mlp.gate.weight",), None)
    q_norm = param_mapping("decoder.layers.3.self_attention.q_layernorm.weight", 3, LAYOUT)
    assert q_norm.hf_names == ("model.layers.3.self_attn.q_norm.weight",)


def test_tp_rank_reads_only_its_slices():
    q, k, v = _qkv_tensors()
    RecordingReader.reads = []
    mapping = param_mapping("decoder.layers.0.self_attention.linear_qkv.weight", 0, LAYOUT)
    _shard(mapping, [q, k, v], 1, 2, reader_cls=RecordingReader)
    # TP rank 1 of 2 owns KV group 1: q heads 4..7 (rows 12..24), k/v rows 3..6
    assert [r[2:] for r in RecordingReader.reads] == [(12, 24), (3, 6), (3, 6)]
    RecordingReader.reads = []
    down = param_mapping("decoder.layers.0.mlp.linear_fc2.weight", 0, LAYOUT)
    _shard(down, [torch.randn(5, 8)], 1, 2, reader_cls=RecordingReader)
    assert RecordingReader.reads == [("model.layers.0.mlp.down_proj.weight", 1, 4, 8)]


def test_wrong_vocab_size_is_refused_naming_the_field():
    mapping = param_mapping("embedding.word_embeddings.weight", None, LAYOUT)
    with pytest.raises(CheckpointMismatchError, match="'vocab_size' is 11 but model.embed_tokens.weight has 12 rows"):
        _shard(mapping, [torch.randn(12, 5)], 0, 1, padded_rows=16)


def test_tensor_smaller_than_config_needs_is_refused():
    mapping = param_mapping("decoder.layers.0.mlp.linear_fc1.weight", 0, LAYOUT)
    reader = DictReader({mapping.hf_names[0]: torch.randn(8, 3), mapping.hf_names[1]: torch.randn(8, 3)})
    with pytest.raises(CheckpointMismatchError, match="different models"):
        reader.read(mapping.hf_names[0], 0, 4, 12)
