"""Hugging Face folder → Megatron torch_dist checkpoint that loads under any TP/PP/EP layout.

    python tools/checkpoint_convert/hf_to_megatron.py --hf-dir <hf_dir> --out <megatron_ckpt_dir> \
        [--dtype bf16|fp16|fp32] [--make-vocab-size-divisible-by 128]

Single process, no GPU. The HF config is validated and each tensor is checked against it before anything
is written; tensors are read from safetensors one at a time. The checkpoint carries the HF config and
tokenizer in ``hf_config/``; start training from it with ``model.megatron_checkpoint=<megatron_ckpt_dir>``.
"""

import argparse
import sys
from pathlib import Path

from megatron_dapo.weights.safetensors_io import DTYPES_BY_NAME


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-dir", required=True, help="Hugging Face folder (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="Megatron checkpoint folder to write (must not exist)")
    parser.add_argument("--dtype", choices=sorted(DTYPES_BY_NAME), default=None, help="default: the HF tensors' dtype")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    args = parser.parse_args(argv)

    from transformers import AutoConfig

    from megatron_dapo.weights.checkpoint_reader import HF_CONFIG_DIR
    from megatron_dapo.distributed import destroy_distributed, initialize_distributed
    from megatron_dapo.weights.hf_export import copy_tokenizer_files
    from megatron_dapo.weights.checkpoint_writer import write_megatron_checkpoint
    from megatron_dapo.weights.safetensors_io import SafetensorsReader

    out, hf_dir = Path(args.out), Path(args.hf_dir)
    try:
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"--out {out} exists and is not empty: choose a new folder")
        if not (hf_dir / "config.json").exists():
            raise FileNotFoundError(f"--hf-dir {hf_dir} has no config.json")
        hf_config = AutoConfig.from_pretrained(hf_dir)
        reader = SafetensorsReader(hf_dir)
        initialize_distributed(1, 1, seed=0)
        write_megatron_checkpoint(reader, hf_config, out, args.make_vocab_size_divisible_by, DTYPES_BY_NAME.get(args.dtype))
        hf_config.save_pretrained(out / HF_CONFIG_DIR)
        copy_tokenizer_files(hf_dir, out / HF_CONFIG_DIR, required=False)
        destroy_distributed()
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # the guard matters: dist-checkpoint saving re-imports __main__
    sys.exit(main())
