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


def sample_continuations(
    model, tokenizer, prompts: list[str], max_new_tokens: int, prefix: list[int], temperature: float, top_k: int | None,
    seed: int, context: int,
) -> list[dict]:
    """Texts that continue `prompts`, each the start of a new document (`prefix`: the ids a document starts after),
    sampled with `seed` so the same model gives the same samples (greedy when `temperature` is 0). The total length
    stays within `context` positions, the longest the model trained on; `top_k` None samples from every token."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    samples = []
    for number, prompt in enumerate(prompts):
        ids = prefix + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        room = max(0, min(max_new_tokens, context - len(ids)))
        inputs = torch.tensor([ids], device=device)
        sampling = dict(do_sample=True, temperature=temperature, top_k=top_k or 0) if temperature > 0 else dict(do_sample=False)
        torch.manual_seed(seed + number)  # each prompt its own seed: a sample does not depend on the prompts before it
        with torch.no_grad():
            output = model.generate(
                input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=room, min_new_tokens=0,
                pad_token_id=tokenizer.pad_token_id, **sampling,
            ) if room else inputs
        text = tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)
        samples.append({"prompt": prompt, "text": prompt + text})
    model.train(was_training)
    return samples


def answer_prompts(
    model, tokenizer, prompts: list, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
    progress=None,
) -> list[dict]:
    """The model's answer to each prompt (a conversation ending in a user turn, templated with the chat template and
    its generation prompt; or a text), greedy when `temperature` is 0, else sampled with `seed + index`, so an answer
    depends on its prompt and the seed only, not on the prompts before it. Each: `{answer, finished}`, finished
    False when `max_new_tokens` cut the answer before it ended. `progress` (a tqdm bar) advances once per answer."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    answers = []
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, list):
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        else:
            inputs = tokenizer(prompt, return_tensors="pt")
        inputs = {k: v.to(device) for k, v in inputs.items()}
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else dict(do_sample=False)
        torch.manual_seed(seed + index)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
        new = output[0, inputs["input_ids"].shape[1] :]
        stops = model.generation_config.eos_token_id
        stops = {stops} if isinstance(stops, int) else set(stops or ())
        finished = len(new) < max_new_tokens or int(new[-1]) in stops
        answers.append({"answer": tokenizer.decode(new, skip_special_tokens=True).strip(), "finished": finished})
        if progress is not None:
            progress.update(1)
    model.train(was_training)
    return answers
