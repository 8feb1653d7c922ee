"""``megatron-dapo`` / ``python -m megatron_dapo``.

- ``train --config FILE [--strict-resume] [key.sub=value ...]``: run DAPO (also under ``torchrun``);
- ``eval --config FILE --hf-dir DIR [key.sub=value ...]``: the held-out evaluation of a Hugging Face folder, no
  training (also under ``torchrun``: the validation problems are spread over the engines);
- ``config [--config FILE] [key.sub=value ...]``: every option with its value and one line of documentation;
- ``plan --config FILE --nodes N --gpus-per-node G --gpu-memory-gib M [key.sub=value ...]``: per-GPU memory of
  training and rollout (pure arithmetic: no process group, no model; ``megatron_dapo/planner.py``).
- ``report OUTPUT_DIR [--out FILE]``: a run's curves from its ``metrics.jsonl`` as ``OUTPUT_DIR/report.png``
  (finished or still running; ``megatron_dapo/report.py``).

Errors the user can fix (``UserError``) end the command with one line on stderr and exit code 2, on every rank.
A stop for a requeue (SIGTERM/SIGUSR1, ``megatron_dapo/preemption.py``) exits with code 75 after a checkpoint;
Ctrl-C (SIGINT) with code 130 after a checkpoint (a second Ctrl-C: at once). A signal before the first step ends
the run with the same codes and one line saying that no checkpoint was written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_dapo.config import DapoConfig, describe_options, load_config
from megatron_dapo.errors import ConfigError, UserError
from megatron_dapo.preemption import (
    REQUEUE_EXIT_CODE, Preempted, Stopped, clear_requeue_marker, write_requeue_marker,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

SHIPPED_MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "models"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-dapo", description="DAPO reinforcement learning on megatron-core")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="run DAPO training",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (section.key = default  # meaning):\n  " + "\n  ".join(describe_options()),
    )
    evaluate = commands.add_parser(
        "eval",
        help="avg@k and pass@k of a Hugging Face folder on the validation problems, as training evaluates",
        description="The training run's evaluation (rollout.val_n samples per problem at rollout.val_temperature and "
        "val_top_p, the same seeds) of any HF folder, without training. Last line: eval: avg@<n>=<x> pass@<n>=<y>.",
    )
    evaluate.add_argument("--hf-dir", help="the HF folder to evaluate (config.json, weights, tokenizer), e.g. "
                          "<trainer.output_dir>/hf_final")
    config = commands.add_parser("config", help="list every config key with its value and documentation")
    plan = commands.add_parser(
        "plan",
        help="per-GPU memory of training and rollout on a cluster; exit code 2 naming the knob if it does not fit",
        description="Will it fit? Pure arithmetic over the configs (docs/planner.md); nothing is allocated.",
    )
    plan.add_argument("--nodes", type=int, required=True, help="nodes of the job")
    plan.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (ranks) per node")
    plan.add_argument("--gpu-memory-gib", type=float, required=True, help="memory of one GPU in GiB (H800/H100: 80)")
    plan.add_argument(
        "--model-config",
        help="the model's HF config.json or its folder (default: model.hf_path's; the toy model's when null), "
        "e.g. examples/models/qwen2.5-32b",
    )
    plan.add_argument(
        "--max-prompt-length", type=int, default=2048,
        help="longest prompt in tokens (DAPO: 2048); the planned sequence is this + rollout.max_response_length",
    )
    plan.add_argument(
        "--layer-spec", choices=["auto", "te", "local"], default="auto",
        help="the actor's layer spec on the target hosts: te (Transformer Engine, GPU) or local; "
        "auto: te when rollout.engine=sglang",
    )
    plan.add_argument("--reserve-gib", type=float, default=3.0, help="per GPU for CUDA context, NCCL, fragmentation")
    report = commands.add_parser(
        "report",
        help="draw a run's metrics.jsonl (finished or still running) as output_dir/report.png",
        description="Accuracy, reward, entropy, response length, clipping, dynamic sampling, evaluation and timing "
        "per step, from OUTPUT_DIR/metrics.jsonl alone.",
    )
    report.add_argument("output_dir", help="the run's trainer.output_dir")
    report.add_argument("--out", help="where to write the PNG (default: OUTPUT_DIR/report.png)")
    train.add_argument(
        "--strict-resume", action="store_true",
        help="trainer.resume=strict: refuse to start when the newest checkpoint is torn instead of falling back",
    )
    for command in (train, evaluate, config, plan):
        command.add_argument("--config", help="YAML config (see examples/configs/)")
        command.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return parser


def _plan_hf_config(config: DapoConfig, model_config: str | None) -> tuple["PretrainedConfig", str]:
    """The model's HF config for ``plan`` and where it came from: ``--model-config``, else ``model.hf_path``'s
    (``examples/models/<its folder name>`` when that folder is not on this machine), else the toy model's."""
    from transformers import AutoConfig

    if model_config is None and config.model.hf_path is None:
        from megatron_dapo.toy import build_toy_tokenizer, toy_hf_config

        return toy_hf_config(config.toy_model, build_toy_tokenizer()), "the toy model (model.hf_path: null)"
    path = Path(model_config or config.model.hf_path)
    file = path if path.is_file() else path / "config.json"
    shipped = SHIPPED_MODEL_CONFIGS / path.name.lower().removesuffix("-base") / "config.json"  # a base model's = its own
    if not file.is_file() and model_config is None and shipped.is_file():
        file = shipped  # the weights live on the cluster; the public config.json ships with the repository
    if not file.is_file():
        where = f"--model-config {path}" if model_config else f"model.hf_path={path}"
        shipped_names = ", ".join(sorted(folder.name for folder in SHIPPED_MODEL_CONFIGS.iterdir()))
        raise ConfigError(
            f"{where} has no config.json; pass --model-config <folder or config.json> (the repository ships "
            f"{shipped_names} under examples/models)"
        )
    try:
        return AutoConfig.from_pretrained(str(file)), str(file)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{file}: not a Hugging Face model config ({error})") from None


def _plan(args: argparse.Namespace, config: DapoConfig) -> int:
    from megatron_dapo.planner import Cluster, PlanOptions, format_report, plan_memory, refusal

    layer_spec = args.layer_spec if args.layer_spec != "auto" else ("te" if config.rollout.engine == "sglang" else "local")
    hf_config, source = _plan_hf_config(config, args.model_config)
    plan = plan_memory(
        config,
        hf_config,
        Cluster(args.nodes, args.gpus_per_node, args.gpu_memory_gib),
        PlanOptions(args.max_prompt_length, layer_spec, args.reserve_gib),
    )
    print(f"model config: {source}", flush=True)
    print(format_report(plan), flush=True)
    error = refusal(plan)
    if error is not None:
        raise error
    return 0


def _report(args: argparse.Namespace) -> int:
    from megatron_dapo.report import write_report

    print(f"report: {write_report(args.output_dir, args.out)}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("plan", "report"):  # one process, no torch.distributed, no megatron
        try:
            return _report(args) if args.command == "report" else _plan(args, load_config(args.config, args.overrides))
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    from megatron_dapo.distributed import is_rank_zero

    try:
        if args.command == "train" and args.config is None:
            raise ConfigError(
                "train needs --config FILE, e.g. --config examples/configs/toy_cpu.yaml (the built-in defaults are "
                "the paper's 32B batch sizes on the toy model; `megatron-dapo config` lists them)"
            )
        strict = ["trainer.resume=strict"] if getattr(args, "strict_resume", False) else []
        config = load_config(args.config, [*args.overrides, *strict])
        if args.command == "config":
            print("\n".join(describe_options(config)))
            return 0
        import datasets
        import transformers

        datasets.disable_progress_bars()  # our own progress bar covers the long phases
        transformers.utils.logging.disable_progress_bar()
        if args.command == "eval":
            from megatron_dapo.evaluator import evaluate_hf_folder

            summary = evaluate_hf_folder(config, args.hf_dir)
            if is_rank_zero():
                for name, value in summary.metrics.items():
                    print(f"{name} = {value:.4f}")
                n = summary.num_samples
                print(f"eval: avg@{n}={summary.avg:.3f} pass@{n}={summary.pass_at_n:.3f}", flush=True)
            return 0
        from megatron_dapo.trainer import train

        before, after = train(config)
    except UserError as error:
        if is_rank_zero():
            print(f"error: {error}", file=sys.stderr)
        return 2
    except (Preempted, Stopped) as stop:
        if is_rank_zero():
            if stop.exit_code == REQUEUE_EXIT_CODE:
                write_requeue_marker(str(stop))
            print(f"{'preempted' if stop.exit_code == REQUEUE_EXIT_CODE else 'interrupted'}: {stop}", flush=True)
        return stop.exit_code
    if is_rank_zero():
        clear_requeue_marker()
    if is_rank_zero() and before is not None:
        print(f"eval accuracy: before={before:.3f} after={after:.3f}", flush=True)
    return 0
