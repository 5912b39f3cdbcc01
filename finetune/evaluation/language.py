"""Held-out evaluation of a causal LM: loss and perplexity on the completion tokens, and greedy answers scored
against the reference answers. Rows are read, templated and masked exactly as training did (finetune.data.sft)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from finetune.data.sft import IGNORE_INDEX, tokenize_row


@dataclass
class Prompted:
    """A held-out row cut where the model should take over: the prompt's token ids and the reference answer."""

    prompt: str  # shown in reports: the last user turn, or the raw prompt
    input_ids: list[int]
    reference: str


def loss_examples(rows: list[dict], tokenizer, max_length: int) -> list[dict]:
    """Token ids and labels as in training, but with the loss on completions only (assistant turns, completions;
    all of a plain `text` row), truncated to `data.max_length` as the trainer does."""
    examples = []
    for row in rows:
        tokens = tokenize_row(row, tokenizer, train_on_inputs=False)
        ids, labels = tokens["input_ids"][:max_length], tokens["labels"][:max_length]
        if any(label != IGNORE_INDEX for label in labels[1:]):
            examples.append({"input_ids": ids, "labels": labels})
    return examples


def held_out_loss(model, examples: list[dict], pad_id: int, batch_size: int = 8, keep_logits: int = 0, progress=None) -> dict:
    """Token-weighted mean cross-entropy over every completion token of `examples`, its perplexity, and (with
    `keep_logits`) the logits at the first `keep_logits` scored positions, to compare variants with.

    Rows are batched by length (less padding) with right padding and an attention mask; `use_cache=False` so
    nothing but the mask decides what attends to what.
    """
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    total, tokens, kept = 0.0, 0, []
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[start : start + batch_size]]
            width = max(len(e["input_ids"]) for e in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, example in enumerate(batch):
                n = len(example["input_ids"])
                ids[row, :n] = torch.tensor(example["input_ids"])
                labels[row, :n] = torch.tensor(example["labels"])
                mask[row, :n] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
            shifted, targets = logits[:, :-1], labels[:, 1:].to(device)
            scored = targets != IGNORE_INDEX
            total += F.cross_entropy(shifted[scored], targets[scored], reduction="sum").item()
            tokens += int(scored.sum())
            if keep_logits > sum(len(k) for k in kept):
                kept.append(shifted[scored][: keep_logits - sum(len(k) for k in kept)].cpu())
            if progress is not None:
                progress.update(len(batch))
    loss = total / max(tokens, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "tokens": tokens,
        "logits": torch.cat(kept) if kept else None,
    }


def prompted_rows(rows: list[dict], tokenizer) -> list[Prompted]:
    """The rows that have a reference answer, cut before it: a chat before its last assistant turn (rendered with
    the generation prompt), or a prompt/completion pair's raw prompt, as training tokenized it. Plain `text` rows
    have no answer to compare with and are left out."""
    out = []
    for row in rows:
        if "messages" in row:
            messages = row["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant" and m["content"].strip())
            text = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            user = next((m["content"] for m in reversed(messages[:last]) if m["role"] == "user"), "")
            out.append(Prompted(user, ids, messages[last]["content"]))
        elif "completion" in row:
            ids = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
            out.append(Prompted(row["prompt"], ids, row["completion"]))
    return out


def generate(model, tokenizer, prompts: list[Prompted], max_new_tokens: int, batch_size: int = 8, seed: int = 0,
             progress=None) -> list[str]:
    """Greedy answers, in the order of `prompts`: batched by prompt length with left padding, stopping at the
    model's end-of-turn tokens (its generation config), special tokens dropped from the text."""
    import torch
    from transformers import set_seed

    set_seed(seed)  # greedy decoding draws nothing, but a sampling generation config must not vary run to run
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = model.generation_config
    answers: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].input_ids))
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            width = max(len(prompts[i].input_ids) for i in chosen)
            ids = torch.full((len(chosen), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chosen), width), dtype=torch.long)
            for row, i in enumerate(chosen):
                n = len(prompts[i].input_ids)
                ids[row, width - n :] = torch.tensor(prompts[i].input_ids)
                mask[row, width - n :] = 1
            output = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, num_beams=1, eos_token_id=config.eos_token_id, pad_token_id=pad,
            )
            for row, i in enumerate(chosen):
                answers[i] = tokenizer.decode(output[row, width:], skip_special_tokens=True).strip()
            if progress is not None:
                progress.update(len(chosen))
    return answers
