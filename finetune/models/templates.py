"""Chat templates a recipe can name instead of the tokenizer's own."""

from __future__ import annotations

from pathlib import Path

from finetune.errors import FinetuneError

BUILTIN = {
    # ChatML, as used by SmolLM2, Qwen and many others; `<|im_end|>` ends every turn.
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}


def resolve_chat_template(value: str) -> str:
    """A built-in name, a path to a Jinja file, or an inline template."""
    if value in BUILTIN:
        return BUILTIN[value]
    path = Path(value)
    if path.suffix in (".jinja", ".j2", ".txt") or path.is_file():
        if not path.is_file():
            raise FinetuneError(f"model.chat_template: file not found: {value}")
        return path.read_text()
    if "{%" in value or "{{" in value:
        return value
    raise FinetuneError(
        f"model.chat_template: {value!r} is neither a built-in template ({', '.join(BUILTIN)}), a file, nor Jinja text."
    )


def chat_template_problem(value: str | None) -> str | None:
    """What keeps `model.chat_template` from resolving (a missing file, an unknown name), checked before loading."""
    if value is None:
        return None
    try:
        resolve_chat_template(value)
    except FinetuneError as exc:
        return str(exc)
    except OSError as exc:  # a file that cannot be read
        return f"model.chat_template: cannot read {value}: {exc.strerror or exc}"
    return None
