"""Chat templates rendered by pagoda against transformers' apply_chat_template(tokenize=False)."""

from __future__ import annotations

import datetime
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pagoda.text import ChatTemplate, Tokenizer
from tests.pagoda.text.templates import CHATML, MISTRAL

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
# Tools as indented JSON, loop controls, a namespace, tool calls, reasoning.
TOOLS_TEMPLATE = """{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}
  {%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}
{%- endfor %}
{%- if tools %}
<tools>
{%- for tool in tools %}
{{ tool | tojson(indent=2) }}
{%- endfor %}
</tools>
{%- endif %}
{%- for m in messages %}
  {%- if m.role == 'system' %}{% continue %}{% endif %}
  {%- if loop.index0 > ns.last_user + 2 %}{% break %}{% endif %}
<{{ m.role }}>
  {%- if m.reasoning_content is defined %}<think>{{ m.reasoning_content }}</think>{% endif %}
  {{- m.content if m.content is defined else '' }}
  {%- if m.tool_calls is defined %}
    {%- for call in m.tool_calls %}
<call>{{ call.function | tojson }}</call>
    {%- endfor %}
  {%- endif %}
</{{ m.role }}>
{%- endfor %}
{%- if add_generation_prompt %}
<assistant>
{%- endif %}"""
# Block tags on their own indented lines: only right with trim_blocks and lstrip_blocks.
INDENTED = """{% for message in messages %}
    {% if message['role'] == 'system' %}
System: {{ message['content'] }}
    {% else %}
{{ message['role'] | capitalize }}: {{ message['content'] }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
Assistant:
{% endif %}
"""
GENERATION_TAG = (
    "{% for m in messages %}{% if m.role == 'assistant' %}"
    "{% generation %}[{{ m.content }}]{% endgeneration %}"
    "{% else %}{{ m.content }}{% endif %}{% endfor %}"
)
TEMPLATES = {
    "chatml": CHATML,
    "llama3": LLAMA3,
    "mistral": MISTRAL,
    "tools": TOOLS_TEMPLATE,
    "indented": INDENTED,
    "generation_tag": GENERATION_TAG,
}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city, e.g. 東京 or Zürich <today> & tomorrow",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
CONVERSATIONS = {
    "user": [{"role": "user", "content": "What is the capital of France?"}],
    "system_user": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "  Hello!  "},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "東京 😀 <b>&amp;</b>"},
    ],
    "tool_call": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "reasoning": "I should call the tool.",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "content": '{"temp": 21}'},
    ],
    "bad_order": [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
    ],
}


def _render_both(
    tok: Tokenizer, hf: Any, template: str, messages: list[dict[str, Any]], **kwargs: Any
) -> None:
    """pagoda's prompt equals transformers', or both refuse (pagoda with ValueError)."""
    try:
        expected = hf.apply_chat_template(
            messages, chat_template=template, tokenize=False, **kwargs
        )
    except Exception as e:
        with pytest.raises(ValueError, match=r"chat template|continue_final_message|cannot"):
            tok.apply_chat_template(messages, chat_template=template, **kwargs)
        return type(e)
    assert tok.apply_chat_template(messages, chat_template=template, **kwargs) == expected
    return None


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_templates_match_transformers(
    template: str, bytelevel_dir: Path, oracle: Callable[[Path], Any]
) -> None:
    tok, hf = Tokenizer.from_dir(bytelevel_dir), oracle(bytelevel_dir)
    source = TEMPLATES[template]
    failures = []
    for name, messages in CONVERSATIONS.items():
        for add_generation_prompt in (True, False):
            tools = TOOLS if name == "tool_call" else None
            failed = _render_both(
                tok,
                hf,
                source,
                messages,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
            )
            if failed:
                failures.append(name)
    # Both refuse the same conversations: Mistral's template rejects a bad role order and
    # the tool role, most templates fail on the assistant message without content.
    assert set(failures) <= {"bad_order", "tool_call"}
    assert ("bad_order" in failures) == (template == "mistral")


@pytest.mark.parametrize("template", ["chatml", "llama3", "mistral", "tools", "indented"])
def test_continue_final_message_matches_transformers(
    template: str, bytelevel_dir: Path, oracle: Callable[[Path], Any]
) -> None:
    tok, hf = Tokenizer.from_dir(bytelevel_dir), oracle(bytelevel_dir)
    for partial in ("The capital of France is", "The capital is ", "Paris\n"):
        messages = [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": partial},
        ]
        assert (
            _render_both(
                tok,
                hf,
                TEMPLATES[template],
                messages,
                add_generation_prompt=False,
                continue_final_message=True,
            )
            is None
        )
    if template == "chatml":
        prompt = tok.apply_chat_template(
            messages[:1] + [{"role": "assistant", "content": "It is"}],
            add_generation_prompt=False,
            continue_final_message=True,
        )
        assert prompt.endswith("<|im_start|>assistant\nIt is")


def test_model_templates_match_transformers(
    llama2_dir: Path, smollm2_dir: Path, oracle: Callable[[Path], Any]
) -> None:
    for folder in (llama2_dir, smollm2_dir):
        tok, hf = Tokenizer.from_dir(folder), oracle(folder)
        for messages in CONVERSATIONS.values():
            for add in (True, False):
                try:
                    expected = hf.apply_chat_template(
                        messages, tokenize=False, add_generation_prompt=add
                    )
                except Exception:
                    with pytest.raises(ValueError):
                        tok.apply_chat_template(messages, add_generation_prompt=add)
                    continue
                assert tok.apply_chat_template(messages, add_generation_prompt=add) == expected


def test_raise_exception_becomes_value_error(llama2_dir: Path) -> None:
    tok = Tokenizer.from_dir(llama2_dir)
    with pytest.raises(ValueError, match="roles must alternate"):
        tok.apply_chat_template(CONVERSATIONS["bad_order"])
    ok = tok.apply_chat_template(CONVERSATIONS["system_user"])
    assert ok == "<s> [INST] Be brief.\n\n  Hello!   [/INST]"


def test_tool_use_template_is_chosen_with_tools(
    bytelevel_dir: Path, tmp_path: Path, oracle: Callable[[Path], Any]
) -> None:
    folder = tmp_path / "two_templates"
    folder.mkdir()
    shutil.copy(bytelevel_dir / "tokenizer.json", folder)
    templates = [
        {"name": "default", "template": CHATML},
        {"name": "tool_use", "template": TOOLS_TEMPLATE},
    ]
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": templates}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok, hf = Tokenizer.from_dir(folder), oracle(folder)
    messages = CONVERSATIONS["user"]
    for tools in (None, TOOLS):
        expected = hf.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True
        )
        assert tok.apply_chat_template(messages, tools=tools) == expected
    assert "<tools>" in tok.apply_chat_template(messages, tools=TOOLS)
    assert tok.apply_chat_template(messages, chat_template="tool_use").startswith("<user>")


def test_extra_variables_reach_the_template(
    bytelevel_dir: Path, oracle: Callable[[Path], Any]
) -> None:
    source = "{{ bos_token }}{% if enable_thinking %}<think>{% endif %}{{ messages[0].content }}"
    tok, hf = Tokenizer.from_dir(bytelevel_dir), oracle(bytelevel_dir)
    for kwargs in ({}, {"enable_thinking": True}, {"bos_token": "<override>"}):
        assert _render_both(tok, hf, source, CONVERSATIONS["user"], **kwargs) is None


def test_tojson_is_transformers() -> None:
    template = ChatTemplate(
        "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ x | tojson(sort_keys=True) }}"
    )
    x = {"b": "東京 <&> 'q'", "a": [1, 2.5, None, True]}
    assert template.render([{"role": "user", "content": ""}], x=x) == "|".join(
        [
            json.dumps(x, ensure_ascii=False),
            json.dumps(x, ensure_ascii=False, indent=2),
            json.dumps(x, ensure_ascii=False, sort_keys=True),
        ]
    )


def test_strftime_now() -> None:
    before = datetime.datetime.now().strftime("%d %B %Y")
    out = ChatTemplate("{{ strftime_now('%d %B %Y') }}").render([{"role": "user", "content": ""}])
    assert out in (before, datetime.datetime.now().strftime("%d %B %Y"))


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ messages.append({'role': 'x'}) }}",
        "{% set ns = namespace(_secret=1) %}",
        "{{ undefined_function() }}",
        "{{ messages[0]['content'] + 1 }}",
    ],
)
def test_sandbox_and_runtime_errors_are_value_errors(source: str) -> None:
    with pytest.raises(ValueError, match="chat template error"):
        ChatTemplate(source).render([{"role": "user", "content": "hi"}])


def test_bad_templates_and_inputs_are_value_errors(bytelevel_dir: Path) -> None:
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")
    tok = Tokenizer.from_dir(bytelevel_dir)
    with pytest.raises(ValueError, match="empty conversation"):
        tok.apply_chat_template([])
    with pytest.raises(ValueError, match="cannot both be set"):
        tok.apply_chat_template(CONVERSATIONS["user"], continue_final_message=True)
    with pytest.raises(ValueError, match="JSON schemas"):
        tok.apply_chat_template(CONVERSATIONS["user"], tools=["get_weather"])
    with pytest.raises(ValueError, match="must be an object"):
        tok.apply_chat_template(["hello"])
    with pytest.raises(ValueError, match="never reads"):
        tok.apply_chat_template(
            CONVERSATIONS["user"],
            chat_template="{{ messages | length }}",
            add_generation_prompt=False,
            continue_final_message=True,
        )


def test_messages_are_not_modified(bytelevel_dir: Path) -> None:
    tok = Tokenizer.from_dir(bytelevel_dir)
    messages = [{"role": "user", "content": "hi", "name": None}]
    tok.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    assert messages == [{"role": "user", "content": "hi", "name": None}]
