"""The model card: what every service but the worker knows of a model.

The gateway needs the tokenizer and the chat template; the scheduler needs the vocab
size, the EOS ids, the longest sequence and the model's identity (to refuse workers
that serve another model). None of them may import torch, so this module reads
everything with the standard library: ``model.json`` of a card written by
``pagoda prepare-model``, or a Hugging Face folder's ``config.json``, weight headers
and tokenizer files when the folder serves as its own card.

The identity is a hash computed here, by one pure function, so that the card (made on
one machine) and the worker (loading the weights on another) agree on the string.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pagoda.v1 import common_pb2

MODEL_JSON = "model.json"
# model.json's "format": a reader refuses a card written by a newer pagoda.
CARD_FORMAT = 1
# Mixed into every identity, so a change to what the hash covers changes every identity.
IDENTITY_VERSION = b"pagoda-model-identity-v1"
# Bytes of each tensor's data that enter the weight index: cheap to read (one small read
# per tensor), yet two fine-tunes of one base model, which share config, shapes and
# tokenizer, get different identities.
WEIGHT_SAMPLE_BYTES = 32
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
# Keys of config.json that say how the file was written, not what the model is.
_PROVENANCE_KEYS = ("transformers_version",)
# Where Hugging Face configs keep the longest sequence, by model family.
_MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length")
_GGUF_MAGIC = b"GGUF"
# A safetensors header larger than this is not a safetensors file.
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


class ModelCardError(ValueError):
    """A path that cannot serve as a model card, with what to do about it."""


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
                eos_token_ids=tuple(_int_list(data.get("eos_token_ids"), "eos_token_ids")),
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


# --- identity -------------------------------------------------------------------------


def canonical_json(value: Any) -> bytes:
    """One byte string per JSON value: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def model_identity(
    config: dict[str, Any], weight_index: Iterable[Sequence[Any]], tokenizer: bytes
) -> str:
    """The model identity: a sha256, in hex, over

    ``IDENTITY_VERSION "\\n" canonical(config) "\\n" canonical(sorted weight index) "\\n"
    tokenizer``.

    ``config`` is the Hugging Face config without provenance keys (``transformers_version``
    and those starting with ``_``); each weight-index entry is a list such as ``[tensor
    name, shape, dtype, hex of the first data bytes]``; ``tokenizer`` is the bytes of
    ``tokenizer.json`` (empty if the folder has none) or, for a GGUF file, the canonical
    JSON of its ``tokenizer.*`` metadata. Canonical JSON values end unambiguously, so
    the separators cannot be forged by the parts.
    """
    clean = {k: v for k, v in config.items() if k not in _PROVENANCE_KEYS and not k.startswith("_")}
    entries = sorted((list(e) for e in weight_index), key=lambda e: (str(e[0]), canonical_json(e)))
    digest = hashlib.sha256()
    for part in (IDENTITY_VERSION, canonical_json(clean), canonical_json(entries)):
        digest.update(part)
        digest.update(b"\n")
    digest.update(tokenizer)
    return digest.hexdigest()


def short_identity(identity: str) -> str:
    """The first 12 hex digits: enough to tell cached cards apart in a folder name."""
    return identity[:12]


def safetensors_index(path: str | Path) -> list[list[Any]]:
    """``[name, shape, dtype, sample hex]`` of every tensor in a safetensors file.

    Reads only the JSON header and ``WEIGHT_SAMPLE_BYTES`` per tensor (no torch).
    """
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ModelCardError(f"{path} is not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", head)
        if size > _MAX_SAFETENSORS_HEADER:
            raise ModelCardError(f"{path} is not a safetensors file (header of {size} bytes)")
        try:
            header = json.loads(f.read(size))
        except ValueError as exc:
            raise ModelCardError(f"{path} is not a safetensors file: {exc}") from None
        base = 8 + size
        entries = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            f.seek(base + begin)
            sample = f.read(min(WEIGHT_SAMPLE_BYTES, end - begin)).hex()
            entries.append([name, list(info["shape"]), info["dtype"], sample])
    return entries


def hf_weight_index(folder: str | Path) -> list[list[Any]]:
    """The weight index of a Hugging Face folder.

    Safetensors are preferred, as transformers prefers them: the files named by
    ``model.safetensors.index.json``, else every ``*.safetensors`` in the folder. For
    ``pytorch_model*.bin`` (pickles, unreadable without torch) each entry is
    ``[file name, [size in bytes], "bin", ""]``.
    """
    folder = Path(folder)
    files = _weight_files(folder, "model.safetensors.index.json", "*.safetensors")
    if files:
        return [entry for file in files for entry in safetensors_index(file)]
    files = _weight_files(folder, "pytorch_model.bin.index.json", "pytorch_model*.bin")
    if files:
        return [[f.name, [f.stat().st_size], "bin", ""] for f in files]
    raise ModelCardError(
        f"{str(folder)!r} has a config.json but no weights (*.safetensors or pytorch_model*.bin)"
    )


def hf_folder_identity(folder: str | Path, *, config: dict[str, Any] | None = None) -> str:
    """The identity of a Hugging Face folder (what its worker and its card both compute)."""
    folder = Path(folder)
    if config is None:
        config = read_json(folder / "config.json")
    tokenizer = folder / "tokenizer.json"
    tokenizer_bytes = tokenizer.read_bytes() if tokenizer.is_file() else b""
    return model_identity(config, hf_weight_index(folder), tokenizer_bytes)


def _weight_files(folder: Path, index_name: str, pattern: str) -> list[Path]:
    index = folder / index_name
    if index.is_file():
        weight_map = read_json(index).get("weight_map") or {}
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelCardError(f"{index} names missing weight files: {', '.join(missing)}")
        return files
    return sorted(p for p in folder.glob(pattern) if p.is_file())


# --- reading Hugging Face configs -----------------------------------------------------


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
    ids = _int_list(items, "eos_token_id")
    return list(dict.fromkeys(ids))


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


# --- names, files and fields ----------------------------------------------------------


def folder_model_name(folder: str | Path) -> str:
    """The name clients use for a Hugging Face folder: its own name, or "org/name" for a
    snapshot in the Hugging Face cache (``models--org--name/snapshots/<commit>``)."""
    folder = Path(folder).resolve()
    repo = folder.parent.parent.name
    if folder.parent.name == "snapshots" and repo.startswith("models--"):
        return repo.removeprefix("models--").replace("--", "/")
    return folder.name


def is_gguf_file(path: str | Path) -> bool:
    """True for a file that starts with the GGUF magic."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == _GGUF_MAGIC


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, with the file named in any error."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelCardError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelCardError(f"{path} does not hold a JSON object")
    return data


def _typed(data: dict[str, Any], key: str, kind: type) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ModelCardError(f"field {key!r} is missing or not a {kind.__name__}")
    return value


def _int_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise ModelCardError(f"{what} must be a list of token ids, not {value!r}")
    return list(value)
