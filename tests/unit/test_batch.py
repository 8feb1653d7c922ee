"""Padding-aware micro-batching: samples sorted by length, each micro-batch cut to its longest sample."""

import torch

from megatron_dapo.batch import padding_aware_micro_batches, unsort_rows


def _batch(lengths, width=10):
    mask = torch.zeros(len(lengths), width)
    for row, length in enumerate(lengths):
        mask[row, length - 3 : length] = 1  # response ends at position `length`
    ids = torch.arange(len(lengths) * width).reshape(len(lengths), width)
    return {"input_ids": ids, "loss_mask": mask}


def test_micro_batches_are_sorted_and_cut_to_their_longest_sample():
    batch = _batch([4, 10, 6, 3, 9, 5])
    micro, order = padding_aware_micro_batches(batch, micro_batch_size=2)
    assert order.tolist() == [1, 4, 2, 5, 0, 3]
    assert [m["input_ids"].shape[1] for m in micro] == [10, 6, 4]
    assert torch.equal(micro[1]["input_ids"], batch["input_ids"][[2, 5], :6])
    assert sum(m["loss_mask"].sum() for m in micro) == batch["loss_mask"].sum()  # no trained token is cut


def test_width_multiple_pads_past_the_batch_width():
    batch = _batch([9, 7, 3, 4], width=9)
    micro, _ = padding_aware_micro_batches(batch, micro_batch_size=2, width_multiple=4)
    assert [m["input_ids"].shape[1] for m in micro] == [12, 4]
    assert micro[0]["loss_mask"][:, 9:].sum() == 0


def test_unsort_rows_inverts_the_order():
    batch = _batch([4, 10, 6, 3, 9, 5])
    micro, order = padding_aware_micro_batches(batch, micro_batch_size=4)
    restored = unsort_rows([m["input_ids"] * m["loss_mask"] for m in micro], order, 10)
    assert torch.equal(restored, batch["input_ids"] * batch["loss_mask"])


def test_token_budget_packs_sorted_samples_up_to_the_budget_and_a_long_one_alone():
    batch = _batch([4, 10, 6, 3, 9, 5, 3, 4], width=10)
    micro, order = padding_aware_micro_batches(batch, micro_batch_size=99, max_tokens=12)
    # sorted 10, 9, 6, 5, 4, 4, 3, 3: 10 alone (two would be 20 > 12), 9 alone, then 6+5 (2 × 6),
    # 4+4+3 (3 × 4), 3 alone (what is left)
    assert [tuple(m["input_ids"].shape) for m in micro] == [(1, 10), (1, 9), (2, 6), (3, 4), (1, 3)]
    assert all(m["input_ids"].numel() <= 12 for m in micro[1:]) and micro[0]["input_ids"].numel() == 10
    assert torch.equal(unsort_rows([m["input_ids"] * m["loss_mask"] for m in micro], order, 10),
                       batch["input_ids"] * batch["loss_mask"])
    tight = padding_aware_micro_batches(batch, micro_batch_size=99, max_tokens=8)[0]
    assert [m["input_ids"].shape[0] for m in tight] == [1, 1, 1, 1, 2, 2]  # 10 and 9 over the budget: alone
    rounded = padding_aware_micro_batches(batch, micro_batch_size=99, width_multiple=4, max_tokens=12)[0]
    assert [tuple(m["input_ids"].shape) for m in rounded] == [(1, 12), (1, 12), (1, 8), (1, 8), (3, 4), (1, 4)]
