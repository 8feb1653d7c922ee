"""Peak resident memory of ``tools/checkpoint_convert/megatron_to_hf.py`` on a ~1 GB checkpoint.

Builds a random Qwen2-shaped HF folder (fp32, ~1 GB, the untied embedding and lm_head the largest tensors),
converts it with ``hf_to_megatron.py``, then runs ``megatron_to_hf.py`` on the checkpoint in a child
process whose peak RSS is read from ``getrusage``. The same is measured for a process that only imports
what the converter imports (the interpreter + torch + transformers floor). The target is
peak < 1.5 × largest tensor + 200 MB; the last line prints both readings against it.

    python benchmarks/bench_convert_memory.py            # ~1 GB checkpoint
    python benchmarks/bench_convert_memory.py --quick    # ~60 MB, seconds
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
MB = 1024**2
IMPORTS_ONLY = "from megatron_dapo.weights import checkpoint_reader, hf_export; import transformers; transformers.AutoConfig"


def model_config(quick: bool):
    from transformers import Qwen2Config

    if quick:
        return Qwen2Config(vocab_size=16384, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    return Qwen2Config(vocab_size=65536, hidden_size=1024, intermediate_size=2816, num_hidden_layers=10,
                       num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)


def write_random_hf_folder(folder: Path, quick: bool) -> tuple[int, int]:
    """A random HF folder written tensor by tensor; returns (total bytes, largest tensor bytes)."""
    import torch

    from megatron_dapo.weights.hf_export import write_hf_folder
    from megatron_dapo.weights.safetensors_io import TensorSpec

    config = model_config(quick)
    h, ffn, d = config.hidden_size, config.intermediate_size, config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (q, h),
                       p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.k_proj.bias": (kv,), p + "self_attn.v_proj.weight": (kv, h),
                       p + "self_attn.v_proj.bias": (kv,), p + "self_attn.o_proj.weight": (h, q),
                       p + "post_attention_layernorm.weight": (h,), p + "mlp.gate_proj.weight": (ffn, h),
                       p + "mlp.up_proj.weight": (ffn, h), p + "mlp.down_proj.weight": (h, ffn)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (config.vocab_size, h)})
    specs = [TensorSpec(name, shape, torch.float32) for name, shape in shapes.items()]
    tensors = ((s.name, torch.randn(s.shape) * 0.02) for s in specs)
    write_hf_folder(specs, tensors, config, folder, max_shard_bytes=256 * MB)
    return sum(s.nbytes for s in specs), max(s.nbytes for s in specs)


def peak_rss_mb(command: list[str]) -> float:
    """Peak RSS of ``command`` (run as the only child of a fresh interpreter)."""
    probe = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
        "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", probe, *command], check=True, capture_output=True, text=True, cwd=ROOT)
    return int(out.stdout.strip()) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        total, largest = write_random_hf_folder(tmp / "hf", args.quick)
        subprocess.run([sys.executable, "tools/checkpoint_convert/hf_to_megatron.py", "--hf-dir", str(tmp / "hf"),
                        "--out", str(tmp / "mg")], check=True, cwd=ROOT, capture_output=True)
        peak = peak_rss_mb([sys.executable, "tools/checkpoint_convert/megatron_to_hf.py", "--load", str(tmp / "mg"),
                            "--out", str(tmp / "hf2"), "--no-progress", "--max-shard-size-mb", "256"])
        floor = peak_rss_mb([sys.executable, "-c", IMPORTS_ONLY])
        index = json.loads((tmp / "hf2" / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == total
    bound = 1.5 * largest / MB + 200
    print(f"checkpoint: {total / MB:.0f} MB fp32, largest tensor {largest / MB:.0f} MB; bound 1.5 x largest + 200 MB = {bound:.0f} MB")
    print(f"import floor (interpreter + torch + transformers): {floor:.0f} MB")
    print(f"megatron_to_hf peak_rss_mb={peak:.0f} above_import_floor_mb={peak - floor:.0f} bound_mb={bound:.0f}")


if __name__ == "__main__":
    main()
