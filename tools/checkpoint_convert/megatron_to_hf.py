"""Megatron torch_dist checkpoint (any TP/PP/EP it was saved with) → Hugging Face folder, tensor by tensor.

    python tools/checkpoint_convert/megatron_to_hf.py --load <megatron_ckpt_dir> --out <hf_dir> \
        [--dtype bf16|fp16|fp32] [--tokenizer <dir>] [--config <hf_config_dir>]

``--load`` is an ``iter_*`` folder or a save folder (its latest checkpoint). The model config comes from
the checkpoint's ``hf_config/`` (written by the trainer and by hf_to_megatron.py) unless ``--config`` is
given; it is checked against the checkpoint's tensors. Peak memory stays near one tensor.
"""

import argparse
import sys
from pathlib import Path

from megatron_dapo.weights.safetensors_io import DTYPES_BY_NAME


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", required=True, help="Megatron checkpoint (iter_* folder or save folder)")
    parser.add_argument("--out", required=True, help="Hugging Face folder to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES_BY_NAME), default=None, help="default: the checkpoint's dtype")
    parser.add_argument("--tokenizer", default=None, help="folder with tokenizer files (default: the checkpoint's hf_config/)")
    parser.add_argument("--config", default=None, help="HF config folder (default: the checkpoint's hf_config/)")
    parser.add_argument("--max-shard-size-mb", type=int, default=5 * 1024)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from transformers import AutoConfig

    from megatron_dapo.weights.checkpoint_reader import HF_CONFIG_DIR, read_hf_tensors, resolve_checkpoint
    from megatron_dapo.weights.hf_export import write_hf_folder

    try:
        checkpoint = resolve_checkpoint(args.load)
        config_dir = Path(args.config) if args.config else checkpoint / HF_CONFIG_DIR
        if not (config_dir / "config.json").exists():
            raise FileNotFoundError(f"{config_dir} has no config.json: pass --config <folder with the model's config.json>")
        hf_config = AutoConfig.from_pretrained(config_dir)
        tokenizer = Path(args.tokenizer) if args.tokenizer else (config_dir if (config_dir / "tokenizer_config.json").exists() else None)
        dtype = DTYPES_BY_NAME.get(args.dtype)
        specs, tensors = read_hf_tensors(checkpoint, hf_config, dtype)
        if dtype is not None:
            hf_config.dtype = dtype
        write_hf_folder(specs, tensors, hf_config, args.out, tokenizer, args.max_shard_size_mb * 1024**2, not args.no_progress)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(specs)} tensors")
    return 0


if __name__ == "__main__":  # the guard matters: dist-checkpoint loading may re-import __main__
    sys.exit(main())
