"""What the host knows about a batch when the collator builds it, written into the batch so that no step has to read
it back from the device (on a GPU every such read waits for all queued work).

The collator runs on the host, on the rows as lists of token ids, before the batch is moved to the device; the
same facts read from device tensors later would each be a host synchronisation inside the training step:

- `label_positions`: the positions whose next token carries a label (the kit's loss projects only those through the
  LM head; found with `nonzero`, whose output size depends on the data);
- `real_tokens`: the tokens that are not padding, for the run's token count (a `.sum().item()` otherwise);
- `packed_bounds`: a padding-free row's example boundaries as host integers, for the per-example attention
  (`cu_seq_lens_q.tolist()` in every layer otherwise).

`label_positions` and `real_tokens` are not model inputs: the trainer takes them out (`HOST_ONLY`) before calling
the model. `packed_bounds` is one: the packed attention implementations read it (models/attention.py).
"""

from __future__ import annotations

from finetune.data.sft import IGNORE_INDEX

LABEL_POSITIONS = "label_positions"
REAL_TOKENS = "real_tokens"
PACKED_BOUNDS = "packed_bounds"
HOST_ONLY = (LABEL_POSITIONS, REAL_TOKENS)


class WithHostFacts:
    """A collator that adds the host facts above to what `collator` (TRL's) builds."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        batch = self.collator(examples)
        labels = batch.get("labels")
        if labels is not None:
            # Position t predicts token t+1: the columns where some row has a target next.
            batch[LABEL_POSITIONS] = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)
        mask = batch.get("attention_mask")
        batch[REAL_TOKENS] = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        if batch.get("cu_seq_lens_q") is not None:
            batch[PACKED_BOUNDS] = tuple(batch["cu_seq_lens_q"].tolist())
        return batch
