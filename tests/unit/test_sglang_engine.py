"""The SGLang adapter against a FAKE SGLang engine that enforces sglang 0.5.23's rules (SGLang cannot run without
CUDA). ``FakeSGLangEngine``, ``fake_serializer`` and the fake ``sglang.srt.managers.io_struct`` module are
labelled stand-ins for the GPU-only external (tests/sglang_fake.py cites the source of each rule); the adapter
under test is the real code.
"""

from __future__ import annotations

import os
import pickle
import sys
import time
import types
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_dapo.rollout.base import GroupRequest
from megatron_dapo.rollout.sglang_engine import SGLangError, SGLangRolloutEngine, serialize_flattened_bucket

from ..sglang_fake import (OUTSIDE_SESSION, FakePayload, FakeSGLangEngine, FlattenedTensorBucket, SchedulerDied,
                           fake_engine_class, fake_serializer, looks_like_pickle_payload, serialize)

SHAPES = {"a": (2, 2), "b": (3,), "c": (4,), "d": (2,)}


@dataclass
class _UpdateWeightVersionReqInput:  # FAKE of sglang.srt.managers.io_struct.UpdateWeightVersionReqInput
    new_version: str
    abort_all_requests: bool = True


@pytest.fixture(autouse=True)
def fake_sglang_io_struct(monkeypatch):
    """FAKE of the one sglang module the adapter imports for the weight version."""
    module = types.ModuleType("sglang.srt.managers.io_struct")
    module.UpdateWeightVersionReqInput = _UpdateWeightVersionReqInput
    for name in ("sglang", "sglang.srt", "sglang.srt.managers"):
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "sglang.srt.managers.io_struct", module)


def _adapter(idle_timeout_s: float = 600.0, **fake_kwargs):
    engine = FakeSGLangEngine(tp_size=1, weight_shapes=SHAPES, **fake_kwargs)
    collected = []
    adapter = SGLangRolloutEngine(engine, [0], None, stop_token_ids=[1], serialize=fake_serializer(lambda: 0),
                                  ipc_collect=lambda: collected.append(len(engine.calls)), idle_timeout_s=idle_timeout_s)
    return adapter, engine, collected


def _names(engine):
    return [call[0] for call in engine.calls]


# ---------------------------------------------------------------- the fake's rules (what the old adapter broke)
def test_the_fake_refuses_what_sglang_refuses():
    """Findings 2, 3 and 7 of the GPU review: each call of the earlier adapter is refused or fatal here."""
    engine = FakeSGLangEngine(tp_size=2, weight_shapes=SHAPES)
    payload = FakePayload(0, {"a": torch.ones(2, 2)})
    # 2: an update outside a session is refused with (False, message), not raised
    assert engine.update_weights_from_tensor([payload, payload], load_format="flattened_bucket") == (False, OUTSIDE_SESSION)
    # 3: resuming a tag that was never released kills the scheduler
    with pytest.raises(SchedulerDied, match="not released"):
        engine.resume_memory_occupation(tags=["weights"])
    # 7: one payload for every TP rank (and from one GPU) is rejected
    engine.begin_weight_update()
    with pytest.raises(SchedulerDied, match="several TP ranks"):
        engine.update_weights_from_tensor([payload, payload], load_format="flattened_bucket")
    with pytest.raises(SchedulerDied, match="got tensors of rank 0"):
        engine.update_weights_from_tensor([payload, FakePayload(0, {"a": torch.ones(2, 2)})], load_format="flattened_bucket")
    assert engine.update_weights_from_tensor([payload, FakePayload(1, {"a": torch.ones(2, 2)})],
                                             load_format="flattened_bucket") == (True, "Success")


# ---------------------------------------------------------------- the adapter, one rank
def test_weight_update_runs_in_one_session_and_flushes_once():
    adapter, engine, collected = _adapter()
    buckets = [[("a", torch.ones(2, 2)), ("b", torch.zeros(3, dtype=torch.bfloat16))], [("c", torch.arange(4.0))],
               [("d", torch.full((2,), 5.0))]]
    adapter.update_weights(iter(buckets))
    assert _names(engine) == ["abort_request", "begin_weight_update", "update_weights_from_tensor",
                              "update_weights_from_tensor", "update_weights_from_tensor", "end_weight_update",
                              "flush_cache", "update_weight_version"]
    updates = [c for c in engine.calls if c[0] == "update_weights_from_tensor"]
    assert all(c[1] == "flattened_bucket" and c[2] is False and c[3] == 1 for c in updates)  # one payload per TP rank
    assert collected == [3, 4, 5]  # ipc_collect after each bucket
    assert torch.equal(engine.weights["c"], torch.arange(4.0)) and engine.weights["b"].dtype == torch.bfloat16
    assert engine.weight_version == "1" and adapter.state_dict() == {"weight_version": 1}
    adapter.update_weights([[("a", torch.zeros(2, 2))]])
    assert engine.weight_version == "2"  # every sync is a new version


def test_refusals_raise_with_sglangs_message():
    adapter, engine, _ = _adapter()
    engine.session = True  # a session left open elsewhere: begin is refused
    with pytest.raises(SGLangError, match="already open"):
        adapter.update_weights([[("a", torch.ones(2, 2))]])


def test_colocated_memory_phases_resume_only_what_was_released():
    adapter, engine, _ = _adapter(idle_timeout_s=42.0)
    engine.in_flight = 3  # requests still running: the adapter waits for idle before releasing
    adapter.release_memory()
    adapter.release_memory()  # nothing more to release
    adapter.resume_memory(("weights",))
    adapter.update_weights([[("a", torch.ones(2, 2))]])
    adapter.resume_memory()
    adapter.resume_memory()  # nothing released: no call (a second resume would kill SGLang's scheduler)
    memory = [c for c in engine.calls if "memory" in c[0] or c[0] == "tokenizer_manager.flush_cache"]
    assert memory == [("tokenizer_manager.flush_cache", 42.0),  # rollout.engine_idle_timeout_s
                      ("release_memory_occupation", ("weights", "kv_cache", "cuda_graph")),
                      ("tokenizer_manager.flush_cache", 42.0),
                      ("resume_memory_occupation", ("weights",)),
                      ("resume_memory_occupation", ("kv_cache", "cuda_graph"))]
    assert engine.offload_tags == set()


def test_groups_are_seeded_per_sample_stop_on_the_tokenizers_eos_and_come_back_as_they_complete():
    script = {5: [7, 9, 9, 9], 8: [4, 1]}  # prompt [5,6] never meets a config EOS; [8] stops on 1
    adapter, engine, _ = _adapter(eos_token_ids=(2,), script=lambda ids, params: script[ids[0]],
                                  delay=lambda ids: 0.02 if ids[0] == 5 else 0.0)
    requests = [GroupRequest(0, [5, 6], 2, 11, 0.7, 0.9, 3), GroupRequest(1, [8], 2, 12, 0.7, 0.9, 3)]
    adapter.submit(requests)
    first = adapter.collect()  # the quick group completes first
    assert list(first) == [1] and [s.token_ids for s in first[1]] == [[4, 1], [4, 1]]
    assert first[1][0].finish_reason == "stop" and first[1][0].logprobs == [-0.25, -0.25]
    second = adapter.collect()
    assert [s.token_ids for s in second[0]] == [[7, 9, 9]] * 2 and second[0][0].finish_reason == "length"
    calls = [c for c in engine.calls if c[0] == "async_generate"]
    assert calls[0][1] == [[5, 6], [5, 6]] and calls[0][3] is True
    params = calls[0][2]
    assert all(p["stop_token_ids"] == [1] and p["top_k"] == -1 and p["max_new_tokens"] == 3 for p in params)
    seeds = [p["sampling_seed"] for call in calls for p in call[2]]
    assert len(set(seeds)) == 4 and engine.ignored_seeds == 0  # one seed per sample, honoured (deterministic mode)
    assert calls[0][4] == ["g000000000s00000", "g000000000s00001"]  # fixed-width ids: abort matches by prefix
    assert adapter.generate(requests)[0][0].token_ids == second[0][0].token_ids  # the same seeds, the same samples


def test_abort_drops_the_groups_still_running():
    adapter, engine, _ = _adapter(delay=lambda ids: 0.05 * ids[0])
    adapter.submit([GroupRequest(key, [key], 1, key, 1.0, 1.0, 3) for key in (1, 2, 3)])
    assert list(adapter.collect()) == [1]
    assert adapter.abort() == 2 and adapter.in_flight == {} and adapter.collect() == {}
    assert ("abort_request", True) in engine.calls
    assert list(adapter.generate([GroupRequest(4, [4], 1, 4, 1.0, 1.0, 3)])) == [4]  # the engine serves on


def test_each_bucket_is_copied_before_the_resharder_reuses_its_memory():
    adapter, engine, _ = _adapter()
    buffer = torch.zeros(4)

    def reusing_buckets():  # like the resharder: one buffer, refilled for every bucket
        for value in range(3):
            buffer.fill_(value)
            yield [("c", buffer)]

    sent = []
    original = engine.update_weights_from_tensor
    engine.update_weights_from_tensor = lambda named_tensors, **kw: (sent.append(named_tensors[0].tensors["c"]), original(named_tensors, **kw))[1]
    adapter.update_weights(reusing_buckets())
    assert [t.tolist() for t in sent] == [[0.0] * 4, [1.0] * 4, [2.0] * 4]


def test_payloads_are_raw_pickle_bytes_not_base64(monkeypatch):
    """The in-process engine takes raw bytes; a base64 string is a third copy of every bucket that it decodes
    again. FAKE ``MultiprocessingSerializer``, ``FlattenedTensorBucket`` and CUDA-IPC patch (tests/sglang_fake.py)."""
    modules = {"sglang.srt.utils": types.ModuleType("sglang.srt.utils"),
               "sglang.srt.utils.patch_torch": types.ModuleType("sglang.srt.utils.patch_torch"),
               "sglang.srt.weight_sync": types.ModuleType("sglang.srt.weight_sync"),
               "sglang.srt.weight_sync.tensor_bucket": types.ModuleType("sglang.srt.weight_sync.tensor_bucket")}
    modules["sglang.srt.utils"].MultiprocessingSerializer = types.SimpleNamespace(serialize=serialize)
    modules["sglang.srt.utils.patch_torch"].monkey_patch_torch_reductions = lambda: None  # CPU tensors: no IPC
    modules["sglang.srt.weight_sync.tensor_bucket"].FlattenedTensorBucket = FlattenedTensorBucket
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    tensors = {"b": torch.arange(3, dtype=torch.bfloat16), "a": torch.linspace(0, 1, 4).reshape(2, 2)}
    payload = serialize_flattened_bucket(list(tensors.items()))
    assert isinstance(payload, bytes) and looks_like_pickle_payload(payload)
    decoded = pickle.loads(payload)
    flat = decoded["flattened_tensor"]
    assert flat.numel() == 3 * 2 + 4 * 4
    for meta in decoded["metadata"]:
        tensor = flat[meta["start_idx"]:meta["end_idx"]].view(meta["dtype"]).reshape(meta["shape"])
        assert torch.equal(tensor, tensors[meta["name"]]), meta["name"]


# ---------------------------------------------------------------- start-up (one process, a world of one)
@pytest.fixture
def world_of_one(tmp_path, monkeypatch):
    """A gloo world of one (``launch`` asks for its rank), and a FAKE ``sglang`` module to put an ``Engine`` in."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    fake_sglang = types.ModuleType("sglang")
    monkeypatch.setitem(sys.modules, "sglang", fake_sglang)
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("NCCL_CUMEM_ENABLE", "0")  # as slurm/env.sh sets it
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    yield fake_sglang
    dist.destroy_process_group()


def _launch(start_timeout_s: float = 60.0, **kwargs):
    return SGLangRolloutEngine.launch("/models/x", [0, 1], None, 0.6, 1, [1], start_timeout_s=start_timeout_s,
                                      idle_timeout_s=60.0, **kwargs)


def test_engine_start_leaves_the_trainers_environment_as_it_was(world_of_one):
    """FAKE ``sglang.Engine``: writes NCCL_ALGO, NCCL_MIN/MAX_NCHANNELS, CUDA_DEVICE_MAX_CONNECTIONS=8, ... into
    the calling process, as sglang 0.5.23 does; the trainer's environment must be unchanged after start."""
    world_of_one.Engine = fake_engine_class(SHAPES)
    before = dict(os.environ)
    adapter = _launch(seeded=True)
    assert adapter.is_host and adapter.engine.server_args["enable_deterministic_inference"] is True
    assert dict(os.environ) == before
    port = adapter.engine.server_args["nccl_port"]
    assert port == 31002 and not 20000 <= port <= 29999  # slurm/launch.sh's MASTER_PORT range, torchrun's 29500


def test_engine_start_past_its_deadline_stops_naming_the_key(world_of_one):
    world_of_one.Engine = fake_engine_class(SHAPES, start_seconds=30.0)
    before, started = dict(os.environ), time.monotonic()
    with pytest.raises(SGLangError, match=r"did not start within 0.2 s; raise rollout.engine_start_timeout_s"):
        _launch(start_timeout_s=0.2)
    assert time.monotonic() - started < 5 and dict(os.environ) == before


# ---------------------------------------------------------------- the adapter, an engine spanning two ranks
def _two_rank_group(rank: int, init_file: str, fail: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    module = types.ModuleType("sglang.srt.managers.io_struct")
    module.UpdateWeightVersionReqInput = _UpdateWeightVersionReqInput
    sys.modules.update({"sglang": types.ModuleType("sglang"), "sglang.srt": types.ModuleType("sglang.srt"),
                        "sglang.srt.managers": types.ModuleType("sglang.srt.managers"), "sglang.srt.managers.io_struct": module})
    engine = FakeSGLangEngine(tp_size=2, weight_shapes={"w": (3,)}, group_ranks=[0, 1]) if rank == 0 else None
    adapter = SGLangRolloutEngine(engine, [0, 1], dist.group.WORLD, serialize=fake_serializer(dist.get_rank),
                                  ipc_collect=lambda: None)
    adapter.update_weights([[("w", torch.full((3,), float(rank)))], [("w", torch.full((3,), 5.0 + rank))]])
    if rank == 0:
        assert torch.equal(engine.weights["w"], torch.full((3,), 5.0))  # TP rank 0 read rank 0's own copy
    if fail:
        if rank == 0:
            engine.update_weights_from_tensor = lambda *args, **kwargs: (False, "bad bucket")
        with pytest.raises(SGLangError, match="bad bucket"):  # the refusal reaches both ranks of the group
            adapter.update_weights([[("w", torch.zeros(3))]])
    dist.destroy_process_group()


@pytest.mark.parametrize("fail", [False, True], ids=["loads", "refusal-reaches-every-rank"])
def test_every_rank_of_the_group_hands_over_its_own_copy(tmp_path, fail):
    mp.spawn(_two_rank_group, args=(str(tmp_path / "rendezvous"), fail), nprocs=2, join=True)


# ---------------------------------------------------------------- routed experts (routing replay) against the FAKE
def test_routed_experts_are_requested_and_decoded_per_forwarded_token():
    """A FAKE engine started with enable_return_routed_experts returns base64 int32 routes of the prompt and every
    output token but the last; the adapter decodes them to [forwarded, layers, k] equal to the fake's script."""
    engine = FakeSGLangEngine(tp_size=1, weight_shapes=SHAPES, enable_return_routed_experts=True, route_shape=(3, 2))
    adapter = SGLangRolloutEngine(engine, [0], None, stop_token_ids=[1], serialize=fake_serializer(lambda: 0),
                                  route_shape=(3, 2))
    results = adapter.generate([GroupRequest(0, [4, 5, 6, 9], 2, 11, 1.0, 1.0, 8)])
    call = engine.calls[-1]
    assert call[0] == "async_generate"
    for sample in results[0]:
        assert sample.token_ids == [7, 7, 1]
        forwarded = [4, 5, 6, 9, 7, 7]  # the prompt, then the output without its last token
        expected = torch.tensor([[[(t + layer + slot) % 8 for slot in range(2)] for layer in range(3)] for t in forwarded],
                                dtype=torch.int32)
        assert torch.equal(sample.routed_experts, expected)


def test_routes_from_an_engine_started_without_capture_are_refused():
    """SGLang started without enable_return_routed_experts silently returns no routes: refused in one line."""
    engine = FakeSGLangEngine(tp_size=1, weight_shapes=SHAPES, enable_return_routed_experts=False)
    adapter = SGLangRolloutEngine(engine, [0], None, stop_token_ids=[1], serialize=fake_serializer(lambda: 0),
                                  route_shape=(3, 2))
    with pytest.raises(SGLangError, match="enable_return_routed_experts"):
        adapter.generate([GroupRequest(0, [4, 5], 1, 11, 1.0, 1.0, 8)])
