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


def load_for_chat(run_dir: str, base_only: bool = False):
    """Base model (+ the run's adapter unless `base_only`) and tokenizer of a finished SFT run."""
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from finetune.errors import FinetuneError
    from finetune.models import resolve_model_path
    from finetune.recipe import load_recipe

    run = Path(run_dir)
    if not (run / "recipe.yaml").is_file():
        raise FinetuneError(f"{run}: not a run folder (no recipe.yaml). Give the output.dir of a finished run.")
    recipe = load_recipe(run / "recipe.yaml")
    base = resolve_model_path(recipe.model)
    tokenizer = AutoTokenizer.from_pretrained(run if (run / "tokenizer_config.json").is_file() else base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if (run / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(run)
    if not base_only and (run / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, run)
    return model, tokenizer, recipe
