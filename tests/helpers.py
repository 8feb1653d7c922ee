"""Helpers shared by several test files: the CLI, tiny HF models, reference log-probs, actors, loss inputs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

ROOT = Path(__file__).resolve().parents[1]
TOY_CONFIG = ROOT / "examples" / "configs" / "toy_cpu.yaml"


_KEY_VALUE = re.compile(r"^[A-Za-z_][\w.]*=")


def run_cli(*overrides: str, timeout: int = 900, command: str = "train", config: Path | None = TOY_CONFIG, env=None):
    """``python -m megatron_dapo <command> --config <config> <overrides>`` in a fresh process, as a user runs it."""
    args = [sys.executable, "-m", "megatron_dapo", command]
    if config is not None:
        args += ["--config", str(config)]
    key_values = [arg for arg in overrides if _KEY_VALUE.match(arg)]
    args += [arg for arg in overrides if not _KEY_VALUE.match(arg)]  # flags, their values and positionals, in order,
    if command == "train":  # before the key=value overrides, as argparse wants
        key_values.append("logging.progress_bar=false")
    return subprocess.run([*args, *key_values], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def metrics_rows(out: Path) -> list[dict]:
    """``<out>/metrics.jsonl``, one dict per line."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def training_rows(out: Path) -> list[dict]:
    """The rows of training steps (step 0 holds the evaluation before the first step)."""
    return [row for row in metrics_rows(out) if row["step"] > 0]


def convert(tool: str, *args: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """Run ``tools/checkpoint_convert/<tool>`` as a user would (plain ``python``)."""
    result = subprocess.run([sys.executable, f"tools/checkpoint_convert/{tool}", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    if expect_ok:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def hf_folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder (sharded with an index, or one file)."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
    tensors = {}
    for name in files:
        tensors.update(load_file(str(folder / name)))
    return tensors


def assert_hf_folders_bit_identical(got_dir: Path, want_dir: Path) -> None:
    got, want = hf_folder_tensors(got_dir), hf_folder_tensors(want_dir)
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


def make_tiny_qwen2(path, tied: bool, seed: int = 0, num_layers: int = 2) -> Qwen2ForCausalLM:
    """A random Qwen2 with GQA, QKV bias, and a vocabulary (50) that Megatron pads (to 128), saved to ``path``."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=1_000_000.0,
        tie_word_embeddings=tied,
        pad_token_id=0,
        eos_token_id=1,
    )
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # large random weights (and non-zero biases) so that layout errors show
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    model.save_pretrained(path)
    return model


def make_tiny_qwen3(path, moe: bool, seed: int = 0, num_layers: int = 2, num_experts: int = 8, top_k: int = 2,
                    norm_topk_prob: bool = True):
    """A random Qwen3 (q/k norms, head_dim 16 ≠ hidden / heads) or Qwen3-MoE (``num_experts`` experts, top-k),
    saved to ``path`` (experts one by one on disk, as HF checkpoints store them)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=50, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6,
                  rope_theta=1_000_000.0, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
    if moe:
        config = Qwen3MoeConfig(**common, intermediate_size=64, moe_intermediate_size=24, num_experts=num_experts,
                                num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob, router_aux_loss_coef=0.0)
        model = Qwen3MoeForCausalLM(config)
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**common, intermediate_size=64))
    with torch.no_grad():  # large random weights so that layout errors show; norms away from 1
        for name, param in model.named_parameters():
            param.normal_(1.0, 0.2) if "norm" in name else param.normal_(0.0, 0.3)
    model.save_pretrained(path)
    return model


def checkpoint_named(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's in-memory tensors (or their gradients) under checkpoint names: fused experts
    (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]) split into HF's per-expert
    ``mlp.experts.<e>.{gate,up,down}_proj.weight``."""
    out = {}
    for name, tensor in named.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            for e, fused in enumerate(tensor):
                out[f"{prefix}{e}.gate_proj.weight"], out[f"{prefix}{e}.up_proj.weight"] = fused.chunk(2, dim=0)
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e, down in enumerate(tensor):
                out[f"{prefix}{e}.down_proj.weight"] = down
        else:
            out[name] = tensor
    return out


def hf_logprobs(model, batch: dict, temperature: float = 1.0) -> torch.Tensor:
    """Reference per-token log-probs of ``batch['labels']`` from a ``transformers`` model (full vocabulary)."""
    logits = model(input_ids=batch["input_ids"]).logits.float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)


def test_config(*overrides: str, **keyed: object):
    """A ``DapoConfig`` from the defaults and ``key.sub=value`` overrides (keyword form: ``{"a.b": v}``)."""
    from megatron_dapo.config import load_config

    return load_config(None, [*overrides, *(f"{k}={v}" for k, v in keyed.items())])


test_config.__test__ = False  # not a test


def build_actor(config, hf_dir, total_steps: int = 1):
    """The Megatron actor as the trainer builds it, from ``config``'s sections."""
    from megatron_dapo.actor.actor import MegatronActor

    return MegatronActor(
        str(hf_dir), config.model, config.parallel, config.optimizer, config.policy_loss(), total_steps=total_steps,
        moe_aux_loss_coef=config.algorithm.moe_aux_loss_coef, routing_replay=config.algorithm.routing_replay == "rollout",
    )


# ---------------------------------------------------------------- inputs of the loss-op tests
VOCAB, PADDED, HIDDEN = 37, 48, 16  # a vocabulary padded the way Megatron pads it


def reference_logprobs_entropy(logits: torch.Tensor, labels: torch.Tensor, temperature: float):
    """Plain autograd over the real vocabulary only (the padding columns dropped), in float64."""
    log_probs = torch.log_softmax(logits[..., :VOCAB].double() / temperature, dim=-1)
    logprob = log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logprob, entropy


def loss_op_inputs(dtype=torch.float32, seed: int = 0):
    """Hidden states ``[3, 10, H]``, a padded output weight, labels and two upstream gradients."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 10, HIDDEN, generator=generator).to(dtype)
    weight = torch.randn(PADDED, HIDDEN, generator=generator).to(dtype)
    labels = torch.randint(0, VOCAB, (3, 10), generator=generator)
    upstream = torch.randn(3, 10, generator=generator), torch.randn(3, 10, generator=generator)
    return hidden, weight, labels, upstream


def dapo_micro_batch(labels: torch.Tensor, seed: int = 5, with_ref: bool = True) -> dict:
    """Side inputs of the DAPO loss for ``labels [b, s]``: masks with different lengths, ratios around 1."""
    generator = torch.Generator().manual_seed(seed)
    b, s = labels.shape
    mask = torch.zeros(b, s)
    for row in range(b):
        mask[row, : 2 + 3 * row] = 1
    batch = {
        "labels": labels,
        "loss_mask": mask,
        "old_logprobs": -3.0 + 0.5 * torch.randn(b, s, generator=generator),
        "advantages": torch.randn(b, 1, generator=generator).expand(b, s).contiguous(),
        "rollout_is_weights": torch.rand(b, s, generator=generator) + 0.5,
    }
    if with_ref:
        batch["ref_logprobs"] = -3.0 + 0.5 * torch.randn(b, s, generator=generator)
    return batch


def naive_dapo_loss(hidden, weight, batch, loss):
    """The DAPO loss terms through the naive (full-vocabulary) log-prob op: the reference for the fused ones."""
    from megatron_dapo.ops import naive_logprobs_entropy
    from megatron_dapo.ops.dapo_loss import dapo_loss_terms

    logprobs, _ = naive_logprobs_entropy(hidden @ weight.t(), batch["labels"], VOCAB, loss.temperature)
    return dapo_loss_terms(logprobs, batch, loss)


def write_torch_dist_checkpoint(save_dir: Path, step: int, finished: bool = True) -> Path:
    """A small checkpoint folder as a finished save leaves it: torch's own writer for ``.metadata`` and the shard,
    the files megatron-core and the trainer add (``finished=False``: without the trainer's last marker)."""
    import torch.distributed.checkpoint as dcp

    folder = save_dir / f"iter_{step:07d}"
    dcp.save({"weight": torch.arange(4096, dtype=torch.float32)}, checkpoint_id=str(folder), no_dist=True)
    (folder / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    torch.save({"trainer": {"step": step}}, folder / "common.pt")
    if finished:
        (folder / "complete").write_text(f"{step}\n")
    return folder
