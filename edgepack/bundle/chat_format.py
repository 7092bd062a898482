"""A decoder's chat template as a table of fixed strings, worked out on the build host.

Devices have no jinja2, and the templates of small instruct models are Jinja programs (loops,
conditions, default system prompts, `trim`, `raise_exception`). Rather than ship a partial Jinja
interpreter that might render some template subtly wrong, the build renders the template with
transformers' own `apply_chat_template` on probe conversations whose contents are sentinels, and
cuts each render at the sentinels. What lies between the contents is a fixed string per pair of
consecutive roles:

    start_system + SYSTEM + system_user + USER + user_assistant + ASSISTANT + assistant_user
    + USER + ... + USER + generation                 (start_user + USER ... without a system)

plus whether a role's content is stripped of surrounding whitespace (Llama 3 and Gemma `trim`).
The table is then checked against the template on other conversations (multi-turn, with and
without a system prompt, contents with spaces, newlines and braces); only a table that reproduces
every one exactly ships. A template that does anything else (content-dependent branches a table
cannot hold) ships no table, with the reason in the manifest, and the runtime refuses chat with
that reason instead of guessing.

The runtime (harness/edgepack_runtime.py, render_chat) renders the conversations an app sends to a model for
a reply: an optional system message first, then user and assistant turns alternating, ending with
a user turn, with the generation prompt.
"""

from __future__ import annotations

from typing import Any

FORMAT_VERSION = 1
_PAD = " \n"  # around each sentinel: kept by a template that does not trim, gone if it does
ROLES = ("system", "user", "assistant")


def _sentinel(role: str, index: int) -> str:
    return f"EDGEPACKCHAT{role.upper()}{index}X"


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _probe(tokenizer: Any, roles: list[str]) -> tuple[list[str], dict[str, bool]]:
    """The render of a conversation of sentinels cut at each content: n + 1 joints, and per role
    whether its content was trimmed. Raises ValueError when a sentinel is missing or out of order."""
    messages = [
        {"role": role, "content": _PAD + _sentinel(role, i) + _PAD} for i, role in enumerate(roles)
    ]
    text = _render(tokenizer, messages)
    joints, trimmed, at = [], {}, 0
    for message in messages:
        padded, bare = message["content"], message["content"].strip()
        found = text.find(padded, at)
        if found >= 0:
            content, trim = padded, False
        else:
            found, content, trim = text.find(bare, at), bare, True
        if found < 0:
            raise ValueError(f"the {message['role']} content does not appear where expected")
        if trimmed.setdefault(message["role"], trim) != trim:
            raise ValueError(f"the {message['role']} content is trimmed in one place, not another")
        joints.append(text[at:found])
        at = found + len(content)
    joints.append(text[at:])
    return joints, trimmed


def _same(name: str, values: list[str]) -> str:
    if len(set(values)) != 1:
        raise ValueError(f"{name} differs between conversations: {values[:2]!r}")
    return values[0]


def derive_table(tokenizer: Any) -> dict[str, Any]:
    """The table for ``tokenizer``'s chat template; ValueError says why there can be none."""
    one, trim = _probe(tokenizer, ["user"])
    turns, trim3 = _probe(tokenizer, ["user", "assistant", "user"])
    table: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "start_user": _same("the text before the first user message", [one[0], turns[0]]),
        "user_assistant": turns[1],
        "assistant_user": turns[2],
        "generation": _same("the generation prompt", [one[1], turns[3]]),
        "trim": {**trim, **trim3},
        "start_system": None,
        "system_user": None,
    }
    try:
        with_system, trim_s = _probe(tokenizer, ["system", "user"])
    except Exception as exc:  # jinja's TemplateError, raise_exception's, ...: no system role
        table["no_system_because"] = _one_line(exc)
    else:
        _same("the generation prompt", [with_system[2], table["generation"]])
        table["start_system"], table["system_user"] = with_system[0], with_system[1]
        table["trim"].update(trim_s)
    return table


def _runtime() -> Any:
    """The device's runtime (harness/edgepack_runtime.py): the table is checked with the very
    renderer that will use it."""
    import importlib.util

    from edgepack.bundle.write import HARNESS_DIR

    spec = importlib.util.spec_from_file_location(
        "edgepack_runtime_chat", HARNESS_DIR / "edgepack_runtime.py"
    )
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


# Conversations the table must reproduce exactly, beyond the probes it was cut from.
CHECKS = (
    [("user", "What is the capital of France?")],
    [("user", "  hello\n\n"), ("assistant", " Hi! How can I help?\n"), ("user", "{{ 1 + 1 }} % 3")],
    [
        ("system", "You are terse.\nAnswer in one line."),
        ("user", "Name a colour."),
        ("assistant", "Blue."),
        ("user", "Another?"),
        ("assistant", "  Red  "),
        ("user", "Thanks, café ☕ 日本"),
    ],
    [("system", ""), ("user", "")],
)


def _end_of_turn(tokenizer: Any, joint: str) -> str | None:
    """The special token that closes an assistant turn (``<|im_end|>``, ``<|eot_id|>``,
    ``<end_of_turn>``): a reply is over when the model writes it, EOS or not."""
    ids = tokenizer(joint, add_special_tokens=False)["input_ids"]
    if not ids:
        return None
    token = tokenizer.convert_ids_to_tokens(ids[0])
    special = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    return token if token in special and joint.startswith(token) else None


def chat_format(tokenizer: Any) -> dict[str, Any]:
    """The manifest's ``generation.chat``: the template's table and end-of-turn token, or
    ``{"table": None, "why": ...}`` when there is no template or no table reproduces it."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return {"table": None, "why": "the model's tokenizer has no chat template"}
    if not isinstance(template, str):
        return {"table": None, "why": "the tokenizer has several named chat templates"}
    render_chat = _runtime().render_chat
    try:
        table = derive_table(tokenizer)
        for conversation in CHECKS:
            messages = [{"role": r, "content": c} for r, c in conversation]
            if messages[0]["role"] == "system" and table["start_system"] is None:
                continue
            want, got = _render(tokenizer, messages), render_chat(table, messages)
            if want != got:
                at = next((i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b),
                          min(len(want), len(got)))  # fmt: skip
                raise ValueError(
                    f"a fixed table renders another text than the template (from character {at}: "
                    f"{want[at : at + 40]!r} vs {got[at : at + 40]!r})"
                )
    except Exception as exc:  # any template or table error means: no table, and why
        return {"table": None, "why": f"the chat template cannot ship as a table: {_one_line(exc)}"}
    return {"table": table, "end_of_turn": _end_of_turn(tokenizer, table["assistant_user"])}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__
