"""Render chat templates with jinja2 exactly as transformers does.

A model's chat template is code from the model's author, run on text from users, so it
runs in jinja2's immutable sandbox. Everything else copies transformers'
``apply_chat_template(..., tokenize=False)``, because a prompt that differs by one space
from the one the model was trained on degrades its answers: the same jinja2 options
(trim_blocks, lstrip_blocks, the loopcontrols extension), the same helpers
(``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII text and takes
``indent``), the same message clean-up and the same ``continue_final_message`` rule. Any
failure becomes ``ValueError``: it depends on the request, so the gateway answers 400.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Where a conversation's last message is continued, transformers appends this marker, renders,
# and cuts the prompt at the marker, so the template's end-of-turn text is dropped.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# Names under which a message's reasoning arrives; templates read the first (or "thinking").
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplate:
    """One compiled template. Compiling costs milliseconds, so the last 32 sources stay
    compiled: building a ``ChatTemplate`` for a source seen recently is free."""

    def __init__(self, source: str) -> None:
        if not isinstance(source, str):
            raise ValueError(f"a chat template is a string, got {type(source).__name__}")
        self.source = source
        self._template = _compile(source)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        **variables: Any,
    ) -> str:
        """The prompt text. ``variables`` hold the special tokens and any extra template
        inputs; ``continue_final_message`` (``True`` or the name of the field to continue)
        leaves the last message open so the model continues it."""
        chat = _prepare_messages(messages)
        if continue_final_message and add_generation_prompt:
            raise ValueError(
                "continue_final_message and add_generation_prompt cannot both be set: the first "
                "continues the last message, the second starts a new assistant message"
            )
        field = "content" if continue_final_message is True else continue_final_message
        final_text = _tag_final_message(chat, field, self.source) if field else ""
        try:
            rendered = self._template.render(
                messages=chat,
                tools=_plain(_check_tools(tools)),
                documents=_plain(_check_documents(documents)),
                add_generation_prompt=add_generation_prompt,
                **_plain(variables),
            )
        except Exception as e:
            raise ValueError(f"chat template error: {e}") from e
        return _cut_at_tag(rendered, final_text) if field else rendered


def select_template(
    templates: Mapping[str, str], name_or_source: str | None, tools: object | None
) -> str:
    """Pick the template source as transformers does: a name among the model's templates
    (anything else passed is itself a template), else ``tool_use`` when tools are given and
    the model has one, else ``default``."""
    if name_or_source is not None:
        return templates.get(name_or_source, name_or_source)
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    if templates:
        raise ValueError(
            "this model has several chat templates and none is named 'default'; name one of "
            f"{sorted(templates)}"
        )
    raise ValueError("this model has no chat template; send a completion request instead")


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    """Compile once per source: every tokenizer of one model shares the template."""
    try:
        return _environment().from_string(source)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template does not compile: {e}") from e


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' ``tojson``: jinja2's own escapes ``<>&'`` for HTML and forces ASCII,
    which would change the prompt."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _TemplateDict:
    """``dict(...)`` for templates, without the class itself (no attribute escapes)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore names, which reach Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"a chat template cannot store the underscore name {name!r} on a namespace"
            )


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks;
    serving only needs it to compile and render its body."""

    tags = frozenset({"generation"})

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render_body(self, caller: jinja2.runtime.Macro) -> str:
        return caller()


def _prepare_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Plain dicts without ``None`` values (many templates print ``None`` or crash on
    ``content: null``), with the reasoning aliases transformers adds."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of message objects")
    if not messages:
        raise ValueError("cannot apply a chat template to an empty conversation")
    chat = []
    for message in messages:
        if hasattr(message, "model_dump"):
            message = message.model_dump()
        if not isinstance(message, Mapping):
            raise ValueError(f"a chat message must be an object, got {message!r}")
        plain = _plain({k: v for k, v in message.items() if v is not None})
        reasoning = next((plain[k] for k in _REASONING_FIELDS if plain.get(k) is not None), None)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        chat.append(plain)
    return chat


def _plain(value: Any) -> Any:
    """Rebuild the template's inputs from JSON types: objects with methods (pydantic
    models, enums, ...) could let a template reach outside the sandbox."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "model_dump"):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _check_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[Any] | None:
    if tools is None:
        return None
    if any(not isinstance(t, Mapping) for t in tools):
        raise ValueError("tools must be JSON schemas (objects)")
    return list(tools)


def _check_documents(documents: Sequence[Mapping[str, Any]] | None) -> list[Any] | None:
    if documents is None:
        return None
    if any(not isinstance(d, Mapping) for d in documents):
        raise ValueError("documents must be objects with 'title' and 'text'")
    return list(documents)


def _tag_final_message(chat: list[dict[str, Any]], field: str, source: str) -> str:
    """Append the continue marker to the final message's text; returns that text."""
    last = chat[-1]
    final = last.get(field)
    if final is None:
        raise ValueError(f"continue_final_message: the final message has no {field!r}")
    fields = [field]
    if field in _REASONING_FIELDS:
        fields = [f for f in _REASONING_FIELDS if last.get(f) == final]
    if not any(f in source for f in fields):
        raise ValueError(f"continue_final_message: the chat template never reads {field!r}")
    if isinstance(final, list | tuple):
        for block in reversed(final):
            if isinstance(block, dict) and isinstance(block.get("text"), str):
                text = block["text"]
                block["text"] = text + _CONTINUE_TAG
                return text
        raise ValueError("continue_final_message: the final message has no text to continue")
    if not isinstance(final, str):
        raise ValueError(f"continue_final_message: the final {field!r} is not text")
    for f in fields:
        last[f] = last[f] + _CONTINUE_TAG
    return final


def _cut_at_tag(rendered: str, final_text: str) -> str:
    """Cut the prompt where the final message ends, as transformers does: at the marker,
    or, where the template stripped the marker's trailing space, also strip the text."""
    tag = _CONTINUE_TAG.strip()
    if final_text.strip() not in rendered or tag not in rendered:
        raise ValueError(
            "continue_final_message: the chat template changes the final message, so the "
            "prompt cannot end inside it"
        )
    at = rendered.rindex(tag)
    if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]
    return rendered[:at].rstrip()
