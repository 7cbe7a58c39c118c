"""What a Hugging Face folder's config files say, read with the standard library.

Model families keep the same facts under different keys (the longest sequence) and in
different files (EOS ids in generation_config.json, config.json or the tokenizer); the
readers here try them in the order transformers does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pagoda.model_card.errors import ModelCardError, read_json

# Where Hugging Face configs keep the longest sequence, by model family.
_MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length")


def architecture_of(config: dict[str, Any], where: Path | str = "config") -> str:
    """The first of ``config["architectures"]``, the name the model registry keys on."""
    archs = config.get("architectures")
    if not archs or not isinstance(archs, list) or not isinstance(archs[0], str):
        raise ModelCardError(f"{where} names no architectures (e.g. LlamaForCausalLM)")
    return archs[0]


def vocab_size_of(config: dict[str, Any], where: Path | str = "config") -> int:
    value = config.get("vocab_size")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelCardError(f"{where} has no valid vocab_size")
    return value


def max_model_len_of(config: dict[str, Any], where: Path | str = "config") -> int:
    """The longest sequence, from whichever of the families' keys the config has."""
    for key in _MAX_LEN_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise ModelCardError(f"{where} has none of {', '.join(_MAX_LEN_KEYS)}")


def eos_ids(value: Any) -> list[int]:
    """An ``eos_token_id`` field (an int, a list of ints, or null) as a list without repeats."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    ids = token_id_list(items, "eos_token_id")
    return list(dict.fromkeys(ids))


def token_id_list(value: Any, what: str) -> list[int]:
    """``value`` if it is a list of token ids; else an error that names the field ``what``."""
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise ModelCardError(f"{what} must be a list of token ids, not {value!r}")
    return list(value)


def hf_eos_token_ids(folder: Path, config: dict[str, Any]) -> tuple[int, ...]:
    """EOS ids as ``generate`` uses them: generation_config.json first, then config.json,
    then the tokenizer's ``eos_token`` looked up in tokenizer.json."""
    generation = folder / "generation_config.json"
    if generation.is_file():
        ids = eos_ids(read_json(generation).get("eos_token_id"))
        if ids:
            return tuple(ids)
    ids = eos_ids(config.get("eos_token_id"))
    if ids:
        return tuple(ids)
    return tuple(_tokenizer_eos_ids(folder))


def folder_model_name(folder: str | Path) -> str:
    """The name clients use for a Hugging Face folder: its own name, or "org/name" for a
    snapshot in the Hugging Face cache (``models--org--name/snapshots/<commit>``)."""
    folder = Path(folder).resolve()
    repo = folder.parent.parent.name
    if folder.parent.name == "snapshots" and repo.startswith("models--"):
        return repo.removeprefix("models--").replace("--", "/")
    return folder.name


def _tokenizer_eos_ids(folder: Path) -> list[int]:
    tok_config = folder / "tokenizer_config.json"
    tok_file = folder / "tokenizer.json"
    if not (tok_config.is_file() and tok_file.is_file()):
        return []
    eos = read_json(tok_config).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if not isinstance(eos, str):
        return []
    tokenizer = read_json(tok_file)
    for added in tokenizer.get("added_tokens") or []:
        if added.get("content") == eos:
            return [int(added["id"])]
    vocab = (tokenizer.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and eos in vocab:
        return [int(vocab[eos])]
    return []
