"""Greedy answers from a model (base or adapter) to chat prompts: the before/after check of a fine-tune."""

from __future__ import annotations


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, system_prompt: str | None = None) -> list[dict]:
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    samples = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        else:
            inputs = tokenizer(prompt, return_tensors="pt")
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        samples.append({"prompt": prompt, "answer": answer})
    model.train(was_training)
    return samples
