"""The model card: its format (``model.json``) and reading a card folder.

The gateway needs the tokenizer and the chat template; the scheduler needs the vocab
size, the EOS ids, the longest sequence and the model's identity (to refuse workers
that serve another model). None of them may import torch, so a card is read with the
standard library: ``model.json`` of a card written by ``pagoda prepare-model``, or a
Hugging Face folder's ``config.json``, weight headers and tokenizer files when the
folder serves as its own card.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pagoda.model_card.errors import ModelCardError, read_json
from pagoda.model_card.gguf_metadata import is_gguf_file
from pagoda.model_card.hf_config import (
    architecture_of,
    folder_model_name,
    hf_eos_token_ids,
    max_model_len_of,
    token_id_list,
    vocab_size_of,
)
from pagoda.model_card.identity import hf_folder_identity
from pagoda.v1 import common_pb2

MODEL_JSON = "model.json"
# model.json's "format": a reader refuses a card written by a newer pagoda.
CARD_FORMAT = 1
# The files a card carries besides model.json; those present are copied from a
# Hugging Face folder. tokenizer.json is required, the others are optional.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


@dataclass(frozen=True)
class ModelCard:
    """One model as the gateway and the scheduler see it.

    ``path`` is the card folder (a prepared card or a Hugging Face folder);
    ``tokenizer_dir`` holds ``tokenizer.json`` and the chat template files.
    """

    path: Path
    name: str
    identity: str
    architecture: str
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_model_len: int
    tokenizer_dir: Path
    # The model's Hugging Face config (for a GGUF file: the one its metadata implies).
    config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)
    # Where the weights were when the card was written (informational).
    source: str | None = None

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        """Read the card at ``path``: a prepared card folder or a Hugging Face folder."""
        folder = Path(path)
        if not folder.exists():
            raise FileNotFoundError(f"model card {str(folder)!r} does not exist")
        if folder.is_file():
            if is_gguf_file(folder):
                raise ModelCardError(
                    f"{str(folder)!r} is a GGUF file, not a model card folder: run "
                    f"`pagoda prepare-model {folder} OUT` (a full install) and use OUT"
                )
            raise ModelCardError(f"{str(folder)!r} is a file; a model card is a folder")
        if (folder / MODEL_JSON).is_file():
            return cls._from_model_json(folder)
        if (folder / "config.json").is_file():
            return cls.from_hf_folder(folder)
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        hint = (
            f"; it holds {ggufs[0]}: run `pagoda prepare-model {folder / ggufs[0]} OUT`"
            if ggufs
            else ""
        )
        raise ModelCardError(
            f"{str(folder)!r} is not a model folder: it has neither {MODEL_JSON} (a card "
            f"written by `pagoda prepare-model`) nor config.json (a Hugging Face checkpoint)" + hint
        )

    @classmethod
    def from_hf_folder(cls, folder: str | Path, *, name: str | None = None) -> ModelCard:
        """Derive the card of a Hugging Face folder, which then serves as its own card."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise ModelCardError(
                f"{str(folder)!r} has no tokenizer.json, so it cannot serve as its own model "
                f"card: run `pagoda prepare-model {folder} OUT`, which converts the tokenizer"
            )
        config = read_json(folder / "config.json")
        return cls(
            path=folder,
            name=name or folder_model_name(folder),
            identity=hf_folder_identity(folder, config=config),
            architecture=architecture_of(config, folder / "config.json"),
            vocab_size=vocab_size_of(config, folder / "config.json"),
            eos_token_ids=hf_eos_token_ids(folder, config),
            max_model_len=max_model_len_of(config, folder / "config.json"),
            tokenizer_dir=folder,
            config=config,
            source=str(folder.resolve()),
        )

    @classmethod
    def _from_model_json(cls, folder: Path) -> ModelCard:
        where = folder / MODEL_JSON
        data = read_json(where)
        fmt = data.get("format")
        if not isinstance(fmt, int) or fmt < 1:
            raise ModelCardError(f"{where}: no valid 'format' field")
        if fmt > CARD_FORMAT:
            raise ModelCardError(
                f"{where} has format {fmt}, written by a newer pagoda (this one reads "
                f"format {CARD_FORMAT} and older): upgrade pagoda or prepare the card again"
            )
        try:
            card = cls(
                path=folder,
                name=_typed(data, "name", str),
                identity=_typed(data, "identity", str),
                architecture=_typed(data, "architecture", str),
                vocab_size=_typed(data, "vocab_size", int),
                eos_token_ids=tuple(token_id_list(data.get("eos_token_ids"), "eos_token_ids")),
                max_model_len=_typed(data, "max_model_len", int),
                tokenizer_dir=folder,
                config=data.get("config") or {},
                source=data.get("source"),
            )
        except ModelCardError as exc:
            raise ModelCardError(f"{where}: {exc}") from None
        if not (folder / "tokenizer.json").is_file():
            raise ModelCardError(f"{folder}: the card has no tokenizer.json; prepare it again")
        return card

    @property
    def tokenizer_file(self) -> Path:
        """The ``tokenizer.json`` that the text module reads with ``tokenizers``."""
        return self.tokenizer_dir / "tokenizer.json"

    def chat_template(self) -> str | None:
        """The default chat template: ``chat_template.jinja`` (as transformers 5 writes it),
        else ``chat_template.json``, else ``tokenizer_config.json``'s field; None if none."""
        jinja = self.tokenizer_dir / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        for file in ("chat_template.json", "tokenizer_config.json"):
            path = self.tokenizer_dir / file
            if not path.is_file():
                continue
            template = read_json(path).get("chat_template")
            if isinstance(template, list):  # named templates: take "default"
                named = {t.get("name"): t.get("template") for t in template}
                template = named.get("default")
            if isinstance(template, str):
                return template
        return None

    def to_json(self) -> dict[str, Any]:
        """The content of ``model.json``."""
        return {
            "format": CARD_FORMAT,
            "name": self.name,
            "identity": self.identity,
            "architecture": self.architecture,
            "vocab_size": self.vocab_size,
            "eos_token_ids": list(self.eos_token_ids),
            "max_model_len": self.max_model_len,
            "source": self.source,
            "config": self.config,
        }

    def write_model_json(self, folder: str | Path) -> Path:
        """Write ``model.json`` into ``folder``; written last, it marks the card complete."""
        path = Path(folder) / MODEL_JSON
        tmp = path.with_name(MODEL_JSON + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    def to_proto(self) -> common_pb2.ModelInfo:
        """The ``pagoda.v1.ModelInfo`` that sessions and registrations carry."""
        return common_pb2.ModelInfo(
            name=self.name,
            identity=self.identity,
            architecture=self.architecture,
            vocab_size=self.vocab_size,
            eos_token_ids=list(self.eos_token_ids),
            max_model_len=self.max_model_len,
        )


def _typed(data: dict[str, Any], key: str, kind: type) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ModelCardError(f"field {key!r} is missing or not a {kind.__name__}")
    return value
