"""The SGLang adapter's call sequence, against a FAKE SGLang engine (SGLang cannot run without CUDA).

FakeSGLangEngine and fake_serialize are labelled stand-ins for the GPU-only external; the adapter under
test is the real code. What is checked: abort before the update, one update call per dtype per bucket
with the flattened-bucket format and one payload per engine TP rank, cache flushed with the last bucket
only, ipc_collect after every bucket, KV cache resumed after the weights, prompt-major samples.
"""

import pytest
import torch

from megatron_dapo.rollout.sglang_engine import SGLangRolloutEngine


class FakeSGLangEngine:
    """FAKE of sglang.Engine (0.5.23 method names): records calls, returns canned generations."""

    def __init__(self):
        self.calls = []
        self.tokenizer_manager = self

    def abort_request(self, rid="", abort_all=False):
        self.calls.append(("abort_request", abort_all))

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        self.calls.append(("update_weights_from_tensor", named_tensors, load_format, flush_cache))

    def release_memory_occupation(self, tags=None):
        self.calls.append(("release_memory_occupation", tags))

    def resume_memory_occupation(self, tags=None):
        self.calls.append(("resume_memory_occupation", tags))

    def generate(self, input_ids, sampling_params, return_logprob):
        self.calls.append(("generate", input_ids, sampling_params, return_logprob))
        return [
            {"output_ids": [7, 1], "meta_info": {"output_token_logprobs": [(-0.5, 7, None), (-0.1, 1, None)],
                                                 "finish_reason": {"type": "stop"}}}
            if row % 2 == 0 else
            {"output_ids": [9, 9, 9], "meta_info": {"output_token_logprobs": [(-1.0, 9, None)] * 3,
                                                    "finish_reason": {"type": "length", "length": 3}}}
            for row in range(len(input_ids))
        ]


def fake_serialize(named_tensors):
    """FAKE of the CUDA-IPC serialisation: keeps a flat copy and the names/shapes."""
    return {"flat": torch.cat([t.flatten() for _, t in named_tensors]),
            "meta": [(name, tuple(t.shape)) for name, t in named_tensors]}


def _adapter(tp_size=2):
    collected = []
    adapter = SGLangRolloutEngine(FakeSGLangEngine(), tp_size, serialize=fake_serialize,
                                  ipc_collect=lambda: collected.append(len(adapter.engine.calls)))
    return adapter, collected


def test_weight_update_call_sequence():
    adapter, collected = _adapter(tp_size=2)
    buckets = [
        [("a", torch.ones(2, 2)), ("b", torch.zeros(3, dtype=torch.bfloat16))],  # two dtypes: two payloads
        [("c", torch.arange(4.0))],
        [("d", torch.full((2,), 5.0))],
    ]
    adapter.update_weights(iter(buckets))
    calls = adapter.engine.calls
    assert calls[0] == ("abort_request", True)
    updates = [c for c in calls if c[0] == "update_weights_from_tensor"]
    assert len(updates) == 4
    assert all(c[2] == "flattened_bucket" and len(c[1]) == 2 for c in updates)  # a payload per engine TP rank
    assert [c[3] for c in updates] == [False, False, False, True]  # flush the cache with the last bucket only
    assert updates[0][1][0]["meta"] == [("a", (2, 2))] and updates[1][1][0]["meta"] == [("b", (3,))]
    assert torch.equal(updates[2][1][0]["flat"], torch.arange(4.0))
    assert collected == [3, 4, 5]  # ipc_collect after each bucket's update calls
    assert calls[-1] == ("resume_memory_occupation", ["kv_cache", "cuda_graph"])


def test_colocated_memory_phases():
    adapter, _ = _adapter()
    adapter.release_memory()
    adapter.resume_memory()
    adapter.update_weights([[("w", torch.ones(1))]])
    names = [c[0] if c[0] != "resume_memory_occupation" else (c[0], tuple(c[1])) for c in adapter.engine.calls]
    assert names == ["release_memory_occupation", ("resume_memory_occupation", ("weights",)), "abort_request",
                     "update_weights_from_tensor", ("resume_memory_occupation", ("kv_cache", "cuda_graph"))]


def test_generate_returns_prompt_major_samples():
    adapter, _ = _adapter()
    samples = adapter.generate([[5, 6], [8]], n=2, temperature=0.7, top_p=0.9, max_new_tokens=3)
    call = adapter.engine.calls[0]
    assert call[1] == [[5, 6], [5, 6], [8], [8]] and call[3] is True
    assert call[2] == {"temperature": 0.7, "top_p": 0.9, "top_k": -1, "max_new_tokens": 3}
    assert [s.prompt_index for s in samples] == [0, 0, 1, 1]
    assert samples[0].token_ids == [7, 1] and samples[0].logprobs == [-0.5, -0.1] and samples[0].finish_reason == "stop"
    assert samples[1].finish_reason == "length" and len(samples[1].logprobs) == 3


@pytest.mark.gpu
def test_real_sglang_engine_updates_weights(tmp_path):
    """Needs CUDA and SGLang 0.5.23: a tiny model's weights pushed by bucket change its greedy output."""
    pytest.importorskip("sglang")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    engine = SGLangRolloutEngine.launch(str(tmp_path), tp_size=1, mem_fraction_static=0.2, seed=0)
    before = engine.generate([[1, 2, 3]], n=1, temperature=1e-5, top_p=1.0, max_new_tokens=4)
    engine.release_memory()
    engine.resume_memory()
    engine.update_weights([[(n, p.detach().cuda() * 0) for n, p in model.named_parameters()]])
    after = engine.generate([[1, 2, 3]], n=1, temperature=1e-5, top_p=1.0, max_new_tokens=4)
    assert before[0].token_ids != after[0].token_ids or before[0].logprobs != after[0].logprobs
    engine.engine.shutdown()


def test_each_bucket_is_serialised_before_the_resharder_reuses_its_memory():
    adapter, _ = _adapter(tp_size=1)
    buffer = torch.zeros(3)

    def reusing_buckets():  # like the resharder: one buffer, refilled for every bucket
        for value in range(3):
            buffer.fill_(value)
            yield [("w", buffer)]

    adapter.update_weights(reusing_buckets())
    sent = [c[1][0]["flat"] for c in adapter.engine.calls if c[0] == "update_weights_from_tensor"]
    assert [t.tolist() for t in sent] == [[0.0] * 3, [1.0] * 3, [2.0] * 3]
