"""Chat templates named in a recipe: built-in, file, inline; and what the SFT data needs of them."""

from __future__ import annotations

import pytest

from finetune.errors import FinetuneError
from finetune.models.templates import BUILTIN, resolve_chat_template


def test_builtin_file_and_inline(tmp_path):
    assert resolve_chat_template("chatml") == BUILTIN["chatml"]
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0]['content'] }}")
    assert resolve_chat_template(str(path)) == "{{ messages[0]['content'] }}"
    assert resolve_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}").startswith("{% for")


def test_unknown_template_is_an_error(tmp_path):
    with pytest.raises(FinetuneError, match=r"model.chat_template: file not found: .*missing.jinja"):
        resolve_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(FinetuneError) as err:
        resolve_chat_template("chatlm")
    assert str(err.value) == "model.chat_template: 'chatlm' is neither a built-in template (chatml), a file, nor Jinja text."


def test_recipe_template_replaces_the_tokenizer_one(tiny_llama_dir):
    from finetune.models.loading import load_tokenizer
    from finetune.data.sft import _tokenize_chat
    from finetune.recipe import validate_recipe

    recipe = validate_recipe(
        {"model": {"name_or_path": str(tiny_llama_dir), "chat_template": "chatml"}, "data": {"train": "x.jsonl"}, "output": {"dir": "o"}}
    )
    tokenizer = load_tokenizer(recipe, str(tiny_llama_dir))
    assert tokenizer.chat_template == BUILTIN["chatml"]
    encoded = _tokenize_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], tokenizer, False)
    kept = [tokenizer.convert_ids_to_tokens(t) for t, lab in zip(encoded["input_ids"], encoded["labels"]) if lab != -100]
    assert kept == ["hello", "<|im_end|>", "\n"]
