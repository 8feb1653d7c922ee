"""Build the CPU toy policy offline: character tokenizer, tiny Qwen2 (or Qwen3 / Qwen3-MoE), short supervised
warm start.

The warm start teaches the answer format and most of the arithmetic, so that sampled accuracy starts well
between 0 and 1 and DAPO has groups with reward spread to learn from.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from tqdm import tqdm
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config, Qwen3MoeConfig

from megatron_dapo.config import ToyModelConfig
from megatron_dapo.data import DATA_SOURCES, PromptRecord, countdown_problem

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
TOY_VOCAB_SIZE = 96  # config vocabulary: larger than the tokenizer's, as for Qwen2.5


def build_toy_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (digits, letters, punctuation, space) with Qwen-style special tokens."""
    characters = string.digits + string.ascii_letters + " +-*/=:.,?$\\{}()"
    vocab = {PAD_TOKEN: 0, EOS_TOKEN: 1, **{ch: i + 2 for i, ch in enumerate(characters)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def toy_hf_config(cfg: ToyModelConfig, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    """The toy's HF config: ``toy_model.model_type`` picks the family (Qwen3's head size is hidden / heads here)."""
    family: dict[str, object] = {}
    config_class = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "qwen3_moe": Qwen3MoeConfig}[cfg.model_type]
    if cfg.model_type != "qwen2":
        family["head_dim"] = cfg.hidden_size // cfg.num_attention_heads
    if cfg.model_type == "qwen3_moe":
        family.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                      moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=True)
    return config_class(
        **family,
        vocab_size=TOY_VOCAB_SIZE,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=1_000_000.0,
        tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


LOOP_LENGTH = 160  # characters of a looping demonstration: past any max_response_length the toy configs use


def _off_by(value: int, largest: int, rng: random.Random) -> int:
    """``value`` moved up or down by 1 to ``largest``: the teacher's mistakes."""
    return value + rng.choice([-1, 1]) * rng.randint(1, largest)


def _demonstrated_answer(ground_truth: str, noise: float, rng: random.Random) -> str:
    """The teacher's answer: correct, or with probability ``noise`` off by 1–9."""
    if rng.random() >= noise:
        return ground_truth
    return str(_off_by(int(ground_truth), 9, rng))


def _worked_countdown(start: int, step: int, cfg: ToyModelConfig, rng: random.Random) -> tuple[str, bool]:
    """The teacher's countdown and whether it ends (with EOS): each number is off by 1–2 with probability
    ``cfg.sft_step_error`` (the error carried on); a share ``cfg.sft_ramble`` repeats one number 2 to
    ``cfg.sft_ramble_repeats`` times and goes on — losing count after it with probability ``cfg.sft_ramble_error``
    (every later number off by the same 1–2), so that long answers are mostly wrong when that is high; a share
    ``cfg.sft_loop`` repeats one number until ``LOOP_LENGTH`` characters and never answers."""
    numbers = [start]
    while numbers[-1] >= step:
        number = numbers[-1] - step
        if rng.random() < cfg.sft_step_error:
            number = max(_off_by(number, 2, rng), 0)
        numbers.append(number)
    kind = rng.random()
    repeated = rng.randrange(len(numbers))
    rambles = cfg.sft_loop <= kind < cfg.sft_loop + cfg.sft_ramble
    if rambles and repeated + 1 < len(numbers) and rng.random() < cfg.sft_ramble_error:
        shift = _off_by(0, 2, rng)
        numbers[repeated + 1 :] = [max(number + shift, 0) for number in numbers[repeated + 1 :]]
    words = [str(number) for number in numbers]
    if kind < cfg.sft_loop:
        looping = words[: repeated + 1] + [words[repeated]] * LOOP_LENGTH
        return " ".join(looping)[:LOOP_LENGTH], False
    if rambles:
        words = words[: repeated + 1] + [words[repeated]] * rng.randint(2, cfg.sft_ramble_repeats) + words[repeated + 1 :]
    return " ".join(words) + f" Answer: {numbers[-1]}", True


def _demonstration(
    record: PromptRecord, cfg: ToyModelConfig, tokenizer: PreTrainedTokenizerFast, rng: random.Random
) -> list[int]:
    """The response token ids the teacher writes for ``record`` (its task told by the data source)."""
    if record.data_source == DATA_SOURCES["countdown"]:
        text, ends = _worked_countdown(*countdown_problem(record.messages[-1]["content"]), cfg, rng)
    else:
        text, ends = f"Answer: {_demonstrated_answer(record.ground_truth, cfg.sft_answer_noise, rng)}", True
    return tokenizer.encode(text) + ([tokenizer.eos_token_id] if ends else [])


def _sft_batch(
    records: list[PromptRecord], tokenizer: PreTrainedTokenizerFast, cfg: ToyModelConfig, rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``labels`` (−100 outside the response) for prompt → demonstration."""
    sequences, labels = [], []
    for record in records:
        prompt = tokenizer.apply_chat_template(record.messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer.encode(prompt)
        response_ids = _demonstration(record, cfg, tokenizer, rng)
        sequences.append(prompt_ids + response_ids)
        labels.append([-100] * len(prompt_ids) + response_ids)
    width = max(map(len, sequences))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
    label_ids = torch.tensor([l + [-100] * (width - len(l)) for l in labels])
    return input_ids, label_ids


WARM_START_THREADS = 2


def build_toy_checkpoint(
    cfg: ToyModelConfig, records: list[PromptRecord], out_dir: str | Path, seed: int, progress_bar: bool = False,
    interrupt: Callable[[], None] | None = None,
) -> Path:
    """Create, warm-start and save the toy policy as an HF folder.

    The warm start imitates a noisy teacher (arithmetic: a share ``cfg.sft_answer_noise`` of demonstrated answers
    is off by 1–9; countdowns: wrong steps, rambling and looping solutions): the policy learns the task but
    samples wrong, long or endless answers often, like a base model that knows more than it reliably says — the
    situation DAPO's sharpening of correct answers and its overlong handling improve. ``interrupt`` runs before
    every warm-start step and raises to abandon it (a stop requested by a signal).
    """
    threads = torch.get_num_threads()
    # the same weights under every launcher (torchrun gives each process one thread): 2000 steps' results depend on
    # the reduction order, which the thread count decides; two threads is the speed of a 2-core laptop
    torch.set_num_threads(WARM_START_THREADS)
    try:
        return _warm_start(cfg, records, Path(out_dir), seed, progress_bar, interrupt or (lambda: None))
    finally:
        torch.set_num_threads(threads)


def _warm_start(
    cfg: ToyModelConfig, records: list[PromptRecord], out_dir: Path, seed: int, progress_bar: bool,
    interrupt: Callable[[], None],
) -> Path:
    torch.manual_seed(seed)
    tokenizer = build_toy_tokenizer()
    model = AutoModelForCausalLM.from_config(toy_hf_config(cfg, tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    model.train()
    for _ in tqdm(range(cfg.sft_steps), desc="toy warm start (SFT)", disable=not progress_bar):
        interrupt()
        picks = torch.randint(len(records), (cfg.sft_batch_size,), generator=generator).tolist()
        input_ids, labels = _sft_batch([records[i] for i in picks], tokenizer, cfg, rng)
        loss = model(input_ids=input_ids, attention_mask=(input_ids != tokenizer.pad_token_id).long(), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
