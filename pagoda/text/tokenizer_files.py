"""Read a Hugging Face tokenizer folder the way transformers 5 does.

``tokenizer.json`` alone does not say everything: tokenizer_config.json (or, in old
folders, special_tokens_map.json) names the special tokens, may add tokens, and holds or
points to the chat template; generation_config.json and config.json list EOS ids. The
rules below follow transformers 5's ``TokenizersBackend`` loading so that pagoda and
transformers see the same vocabulary. They are easy to get wrong, so each is spelled out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

# transformers' named special tokens, in its order (all_special_ids follows it).
STANDARD_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# transformers writes int(1e30) when a tokenizer has no length limit.
_NO_LENGTH_LIMIT = 10**20
_ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


@dataclass
class TokenizerFiles:
    """What a tokenizer folder says, resolved; the backend already holds the added tokens."""

    backend: Backend
    special_tokens: dict[str, str] = field(default_factory=dict)
    extra_special_tokens: list[str] = field(default_factory=list)
    chat_templates: dict[str, str] = field(default_factory=dict)
    eos_token_ids: list[int] = field(default_factory=list)
    model_max_length: int | None = None
    clean_up_tokenization_spaces: bool = False
    clean_up_even_for_bpe: bool = False


def read_tokenizer_files(path: str | PathLike[str]) -> TokenizerFiles:
    """Read and resolve a tokenizer folder; see the module docstring."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {str(folder)!r} does not exist")
    tokenizer_json = folder / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} has no tokenizer.json; pagoda reads only fast (tokenizers) "
            "tokenizers: save the tokenizer with transformers' save_pretrained to write one"
        )
    try:
        backend = Backend.from_file(str(tokenizer_json))
    except Exception as e:
        raise ValueError(f"cannot read {str(tokenizer_json)!r}: {e}") from e
    # transformers never pads or truncates unless asked, whatever tokenizer.json says; but
    # the padding there names a pad token.
    padding = backend.padding
    backend.no_truncation()
    backend.no_padding()

    config = _read_json(folder / "tokenizer_config.json")
    pad_token = padding.get("pad_token") if padding else None
    named, extras = _register_special_tokens(backend, config, folder, pad_token)
    backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
    eos_ids = _eos_token_ids(backend, named.get("eos_token"), folder)
    max_length = config.get("model_max_length")
    return TokenizerFiles(
        backend=backend,
        special_tokens=named,
        extra_special_tokens=extras,
        chat_templates=_chat_templates(folder, config),
        eos_token_ids=eos_ids,
        model_max_length=(
            int(max_length)
            if isinstance(max_length, int | float) and 0 < max_length < _NO_LENGTH_LIMIT
            else None
        ),
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        clean_up_even_for_bpe=bool(
            config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")
        ),
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {str(path)!r}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} does not hold a JSON object")
    return data


def _register_special_tokens(
    backend: Backend, config: dict[str, Any], folder: Path, pad_token: str | None
) -> tuple[dict[str, str], list[str]]:
    """Add the folder's special and added tokens to ``backend`` as transformers does.

    transformers 5 re-adds every entry of ``added_tokens_decoder`` (in id order), then each
    named or extra special token that is not an added token yet; a token that is named
    special becomes special even when tokenizer.json says otherwise. Without
    ``added_tokens_decoder`` (folders older than transformers 4.34) it reads
    special_tokens_map.json, which then overrides tokenizer_config.json, and takes the added
    tokens from tokenizer.json. Returns the named tokens and the extra special tokens.
    """
    config = dict(config)
    decoder: dict[int, AddedToken] = {}
    if isinstance(config.get("added_tokens_decoder"), dict):
        for i, value in config["added_tokens_decoder"].items():
            if (token := _added_token(value, special=None)) is not None:
                decoder[int(i)] = token
    else:
        config.update(_read_json(folder / "special_tokens_map.json"))
        decoder = dict(backend.get_added_tokens_decoder())
    if pad_token is not None:
        config.setdefault("pad_token", pad_token)
    by_content = {t.content: t for t in decoder.values()}

    named: dict[str, AddedToken] = {}
    for key in STANDARD_SPECIAL_TOKENS:
        token = _added_token(config.get(key), special=True)
        if token is not None:
            named[key] = by_content.get(token.content, token)
    specific = config.get("extra_special_tokens")
    for key, value in [*config.items(), *(specific.items() if isinstance(specific, dict) else [])]:
        if key.endswith("_token") and key not in STANDARD_SPECIAL_TOKENS:
            token = _added_token(value, special=True)
            if token is not None:
                named[key] = token
    extras = _extra_special_tokens(config)

    present = {t.content for t in backend.get_added_tokens_decoder().values()}
    to_add = [t for _, t in sorted(decoder.items())]
    seen = present | {t.content for t in to_add}
    for token in [*named.values(), *extras]:
        if token.content not in seen:
            to_add.append(token)
            seen.add(token.content)
    named_contents = {t.content for t in named.values()}
    for token in to_add:
        if token.content in named_contents:
            token.special = True
    backend.add_tokens(to_add)
    return {k: t.content for k, t in named.items()}, [t.content for t in extras]


def _extra_special_tokens(config: dict[str, Any]) -> list[AddedToken]:
    """``extra_special_tokens`` (transformers 5) or ``additional_special_tokens`` (4.x)."""
    values = config.get("extra_special_tokens")
    if not isinstance(values, list) or not values:
        values = config.get("additional_special_tokens")
    if not isinstance(values, list):
        return []
    tokens = (_added_token(v, special=True) for v in values)
    return [t for t in tokens if t is not None]


def _added_token(value: Any, special: bool | None) -> AddedToken | None:
    """An ``AddedToken`` from a string or a serialized dict; ``special``, unless ``None``,
    overrides the dict's flag (a token named special is special)."""
    if isinstance(value, str):
        return AddedToken(value, special=bool(special))
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        fields = {k: value[k] for k in _ADDED_TOKEN_FIELDS if k in value}
        if special is not None:
            fields["special"] = special
        return AddedToken(**fields)
    return None


def _chat_templates(folder: Path, config: dict[str, Any]) -> dict[str, str]:
    """Named templates. transformers 5 writes chat_template.jinja (and
    additional_chat_templates/*.jinja); files win over the tokenizer_config.json entry,
    which is a string or a list of ``{name, template}``."""
    templates: dict[str, str] = {}
    default = folder / "chat_template.jinja"
    if default.is_file():
        templates["default"] = default.read_text(encoding="utf-8")
    extra_dir = folder / "additional_chat_templates"
    if extra_dir.is_dir():
        for file in sorted(extra_dir.glob("*.jinja")):
            templates[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    if templates:
        return templates
    entry = config.get("chat_template")
    if isinstance(entry, str):
        return {"default": entry}
    if isinstance(entry, list):
        return {t["name"]: t["template"] for t in entry if isinstance(t, dict) and "name" in t}
    return {}


def _eos_token_ids(backend: Backend, eos_token: str | None, folder: Path) -> list[int]:
    """The tokenizer's EOS, then generation_config.json's ``eos_token_id`` (int or list),
    or config.json's when generation_config.json has none (what transformers' generate
    stops on)."""
    ids: list[int] = []
    if eos_token is not None and (eos_id := backend.token_to_id(eos_token)) is not None:
        ids.append(eos_id)
    model_ids = _id_list(_read_json(folder / "generation_config.json").get("eos_token_id"))
    if not model_ids:
        model_ids = _id_list(_read_json(folder / "config.json").get("eos_token_id"))
    return list(dict.fromkeys(ids + model_ids))


def _id_list(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []
