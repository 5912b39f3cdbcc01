"""An Ollama Modelfile for an exported GGUF: FROM the file, a TEMPLATE (Go text/template) that renders the same prompt
as the model's Jinja chat template, and stop parameters for its end-of-turn tokens.

The template is derived, not guessed: the chat template is rendered on marker conversations, and each role's text
before and after a message is read off (ChatML: "<|im_start|>user\\n" ... "<|im_end|>\\n"). The derived pieces are
then checked by rendering other conversations both ways; a template that does not decompose this way (one that
changes a message by its position beyond the first) gets no TEMPLATE, and Ollama falls back to the GGUF's own.
"""

from __future__ import annotations

from dataclasses import dataclass

MARK = "\x00M{}\x00"


@dataclass
class ChatPieces:
    """Each role's text around a message, the default system block, and the generation prompt."""

    before: dict[str, str]
    after: dict[str, str]
    default_system: str  # rendered when the conversation does not open with a system message
    generation: str

    def render(self, messages: list[dict], generation: bool = True) -> str:
        """What the derived template renders for `messages` (with the generation prompt, as Ollama renders it)."""
        text = self.default_system if messages and messages[0]["role"] != "system" else ""
        for m in messages:
            text += self.before[m["role"]] + m["content"] + self.after[m["role"]]
        return text + (self.generation if generation else "")


def _render(tokenizer, messages: list[dict], generation: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _between(text: str, start: str | None, end: str | None) -> str:
    i = text.index(start) + len(start) if start else 0
    j = text.index(end, i) if end else len(text)
    return text[i:j]


def chat_pieces(tokenizer) -> ChatPieces | None:
    """Decompose the chat template into per-role pieces, or None when it does not decompose (checked)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    s, u1, a1, u2, a2 = (MARK.format(i) for i in range(5))
    sys, user, assistant = ({"role": r, "content": c} for r, c in (("system", s), ("user", u1), ("assistant", a1)))
    user2 = {"role": "user", "content": u2}
    try:
        r_u = _render(tokenizer, [user])
        r_ua = _render(tokenizer, [user, assistant])
        r_uau = _render(tokenizer, [user, assistant, user2])
        r_su = _render(tokenizer, [sys, user])
        r_u_gen = _render(tokenizer, [user], generation=True)
    except Exception:  # the template refuses one of the marker conversations
        return None
    after_user = _between(r_uau, u2, None)
    after_assistant = _between(r_ua, a1, None)
    user_to_assistant = _between(r_uau, u1, a1)
    assistant_to_user = _between(r_uau, a1, u2)
    before_user_plus = _between(r_u, None, u1)  # the default system block (if any), then what opens a user turn
    if not (user_to_assistant.startswith(after_user) and assistant_to_user.startswith(after_assistant)
            and r_u_gen.startswith(r_u)):  # fmt: skip
        return None
    before_assistant = user_to_assistant[len(after_user):]
    before_user = assistant_to_user[len(after_assistant):]
    if not before_user_plus.endswith(before_user):
        return None
    default_system = before_user_plus[: len(before_user_plus) - len(before_user)]
    sys_to_user = _between(r_su, s, u1)
    if not sys_to_user.endswith(before_user):
        return None
    pieces = ChatPieces(
        before={"system": _between(r_su, None, s), "user": before_user, "assistant": before_assistant},
        after={"system": sys_to_user[: len(sys_to_user) - len(before_user)], "user": after_user, "assistant": after_assistant},
        default_system=default_system,
        generation=r_u_gen[len(r_u):],
    )
    checks = [
        [sys, user, assistant, user2, {"role": "assistant", "content": a2}, user],
        [sys, user, assistant],
        [user, assistant, user2],
        [sys, user],
    ]
    for messages in checks:
        for generation in (True, False):
            try:
                if pieces.render(messages, generation) != _render(tokenizer, messages, generation):
                    return None
            except Exception:
                return None
    return pieces


def _go_text(text: str) -> str:
    """Literal text inside a Go template ('{{' would open an action)."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(pieces: ChatPieces) -> str:
    """The Ollama TEMPLATE rendering `pieces` over `.Messages`."""
    branches = []
    for i, role in enumerate(("system", "user", "assistant")):
        keyword = "if" if i == 0 else "else if"
        branches.append(
            f'{{{{ {keyword} eq $m.Role "{role}" }}}}{_go_text(pieces.before[role])}{{{{ $m.Content }}}}{_go_text(pieces.after[role])}'
        )
    default = ""
    if pieces.default_system:
        default = f'{{{{ if and (eq $i 0) (ne $m.Role "system") }}}}{_go_text(pieces.default_system)}{{{{ end }}}}'
    return (
        f"{{{{- range $i, $m := .Messages }}}}{default}{''.join(branches)}{{{{ end }}}}{{{{ end }}}}"
        f"{_go_text(pieces.generation)}"
    )


def stop_tokens(pieces: ChatPieces | None, special_tokens: list[str], eos: str | None) -> list[str]:
    """The special tokens that close a turn (and the EOS): generation stops at any of them."""
    found = []
    if pieces is not None:
        closing = pieces.after["assistant"] + pieces.after["user"]
        found = [t for t in special_tokens if t and t in closing]
    if eos and eos not in found:
        found.append(eos)
    return found


def modelfile(gguf_name: str, pieces: ChatPieces | None, stops: list[str]) -> str:
    """The Modelfile text: FROM, TEMPLATE (when derived), stop parameters."""
    lines = [f"FROM ./{gguf_name}", ""]
    if pieces is not None:
        lines += [f'TEMPLATE """{go_template(pieces)}"""', ""]
    lines += [f'PARAMETER stop "{t}"' for t in stops]
    return "\n".join(lines) + "\n"
