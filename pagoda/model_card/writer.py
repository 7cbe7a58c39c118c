"""Writing model cards, and the identity a worker reports when it registers.

A card is written where the weights are (a full install): converting a GGUF file's
tokenizer into ``tokenizer.json`` needs transformers, which is imported only for that.
The identity is computed from the model itself (config, weight index, tokenizer) by
``pagoda.model_card.identity.model_identity``, so the card and every worker that loads
the same weights agree on it without sharing anything but the files.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagoda.model_card.card import MODEL_JSON, TOKENIZER_FILES, ModelCard
from pagoda.model_card.errors import ModelCardError, read_json
from pagoda.model_card.gguf_metadata import (
    gguf_config,
    gguf_tokenizer_bytes,
    gguf_weight_index,
    is_gguf_file,
    open_gguf,
)
from pagoda.model_card.hf_config import (
    architecture_of,
    eos_ids,
    folder_model_name,
    hf_eos_token_ids,
    max_model_len_of,
    vocab_size_of,
)
from pagoda.model_card.identity import hf_folder_identity, model_identity, short_identity

if TYPE_CHECKING:
    from gguf import GGUFReader

# A GGUF file name usually ends in its quantization ("Model.Q4_1.gguf",
# "model-q4_k_m.gguf"); the model's name is what comes before it.
_QUANT_SUFFIX = re.compile(r"[.-](?:I?Q\d\w*|F16|F32|BF16)$", re.IGNORECASE)


def identity_of(model_path: str | Path) -> str:
    """The identity of the model a worker loads: a Hugging Face folder or a GGUF file.

    Equal to the identity in the card that ``prepare_model_card`` writes for it; reads
    only metadata and a few bytes per tensor, never the whole weights.
    """
    path = Path(model_path)
    if is_gguf_file(path):
        return _gguf_config_and_identity(open_gguf(path))[1]
    if path.is_dir() and (path / "config.json").is_file():
        return hf_folder_identity(path)
    if not path.exists():
        raise FileNotFoundError(f"model {str(path)!r} does not exist")
    if path.is_dir() and (path / MODEL_JSON).is_file():
        raise ModelCardError(
            f"{str(path)!r} is a model card, which holds no weights: give the worker the "
            f"model itself (a Hugging Face folder or a GGUF file)"
        )
    raise ModelCardError(
        f"{str(path)!r} is neither a Hugging Face folder (with config.json) nor a GGUF file"
    )


def prepare_model_card(model: str | Path, out: str | Path, *, name: str | None = None) -> ModelCard:
    """Write the model card of ``model`` (a Hugging Face folder or a GGUF file) into
    ``out`` and return it.

    For a folder: its tokenizer and chat template files are copied (a folder with only
    a slow tokenizer gets one converted to ``tokenizer.json``). For a GGUF file: its
    tokenizer is converted by transformers and ``model.json`` carries the config that
    its metadata implies. ``model.json`` is written last, so a card that has it is whole.
    """
    path = Path(model)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ModelCardError(f"cannot write a model card into {str(out)!r}: it is a file")
    if is_gguf_file(path):
        return _prepare_gguf(path, out, name=name)
    if path.is_dir() and (path / "config.json").is_file():
        return _prepare_hf_folder(path, out, name=name)
    identity_of(path)  # raises the error that fits what path is
    raise AssertionError("unreachable")


def ensure_model_card(model_path: str | Path, cache_dir: str | Path | None = None) -> ModelCard:
    """The card of a model, prepared at most once.

    A card folder or a Hugging Face folder with ``tokenizer.json`` is its own card. A
    GGUF file (or a folder that needs its tokenizer converted) is prepared into
    ``cache_dir`` (default: ``default_cache_dir()``) as ``<name>-<short identity>``, and
    that folder is reused as long as it holds a card of the same identity. The card is
    written in a temporary folder and renamed, so a concurrent process never reads half
    of it.
    """
    path = Path(model_path)
    if path.is_dir() and (
        (path / MODEL_JSON).is_file()
        or (path / "tokenizer.json").is_file()
        or not (path / "config.json").is_file()
    ):
        return ModelCard.load(path)  # its own card, or the error that says what is wrong
    reader: GGUFReader | None = None
    if is_gguf_file(path):
        reader = open_gguf(path)
        identity = _gguf_config_and_identity(reader)[1]
    else:
        identity = identity_of(path)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / f"{card_name(path).replace('/', '--')}-{short_identity(identity)}"
    cached = _cached_card(folder, identity)
    if cached is not None:
        return cached
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=root))
    try:
        if reader is not None:
            _prepare_gguf(path, tmp, name=None, reader=reader)
        else:
            _prepare_hf_folder(path, tmp, name=None)
        if folder.exists():  # a card of an older format, or a broken one
            shutil.rmtree(folder)
        try:
            tmp.rename(folder)
        except OSError:
            cached = _cached_card(folder, identity)  # another process was faster
            if cached is None:
                raise
            return cached
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ModelCard.load(folder)


def default_cache_dir() -> Path:
    """Where prepared cards are kept: ``$PAGODA_CACHE/cards``, else
    ``~/.cache/pagoda/cards``."""
    base = os.environ.get("PAGODA_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "pagoda"
    return root / "cards"


def card_name(model_path: str | Path) -> str:
    """The name clients use for a model: a GGUF file's stem without its quantization
    suffix ("SmolLM2-135M-Instruct.Q4_1.gguf" -> "SmolLM2-135M-Instruct"), or a folder's
    name (see ``folder_model_name``)."""
    path = Path(model_path)
    if path.suffix.lower() == ".gguf" or path.is_file():
        return _QUANT_SUFFIX.sub("", path.stem) or path.stem
    return folder_model_name(path)


# --- preparing ------------------------------------------------------------------------


def _prepare_hf_folder(folder: Path, out: Path, *, name: str | None) -> ModelCard:
    if out.resolve() == folder.resolve():
        raise ModelCardError(
            f"the card of {str(folder)!r} would overwrite the folder's own files: choose "
            f"another OUT (a folder with tokenizer.json already serves as its own card)"
        )
    config = read_json(folder / "config.json")
    where = folder / "config.json"
    identity = hf_folder_identity(folder, config=config)
    _start_card(out)
    converted: set[str] = set()
    if not (folder / "tokenizer.json").is_file():
        converted = _convert_tokenizer(out, str(folder), what=str(folder))
    for file in TOKENIZER_FILES:
        if file not in converted and (folder / file).is_file():
            shutil.copyfile(folder / file, out / file)
    card = ModelCard(
        path=out,
        name=name or card_name(folder),
        identity=identity,
        architecture=architecture_of(config, where),
        vocab_size=vocab_size_of(config, where),
        eos_token_ids=hf_eos_token_ids(folder, config),
        max_model_len=max_model_len_of(config, where),
        tokenizer_dir=out,
        config=config,
        source=str(folder.resolve()),
    )
    card.write_model_json(out)
    return ModelCard.load(out)


def _prepare_gguf(
    path: Path, out: Path, *, name: str | None, reader: GGUFReader | None = None
) -> ModelCard:
    reader = reader if reader is not None else open_gguf(path)
    config, identity = _gguf_config_and_identity(reader)
    _start_card(out)
    _convert_tokenizer(out, str(path.parent), what=str(path), gguf_file=path.name)
    card = ModelCard(
        path=out,
        name=name or card_name(path),
        identity=identity,
        architecture=architecture_of(config),
        vocab_size=vocab_size_of(config),
        eos_token_ids=tuple(eos_ids(config.get("eos_token_id"))),
        max_model_len=max_model_len_of(config),
        tokenizer_dir=out,
        config=config,
        source=str(path.resolve()),
    )
    card.write_model_json(out)
    return ModelCard.load(out)


def _gguf_config_and_identity(reader: GGUFReader) -> tuple[dict[str, Any], str]:
    config = gguf_config(reader)
    identity = model_identity(config, gguf_weight_index(reader), gguf_tokenizer_bytes(reader))
    return config, identity


def _start_card(out: Path) -> None:
    """Make ``out`` and drop what an earlier card left there (model.json first, so the
    folder never looks whole while it is being written)."""
    out.mkdir(parents=True, exist_ok=True)
    for file in (MODEL_JSON, *TOKENIZER_FILES):
        (out / file).unlink(missing_ok=True)


def _convert_tokenizer(out: Path, source: str, *, what: str, **kwargs: Any) -> set[str]:
    """Write ``tokenizer.json`` (+ its config and chat template) with transformers;
    return the names of the files written."""
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ModelCardError(
            f"converting the tokenizer of {what} needs transformers (pip install "
            f"'pagoda[worker]'): {exc}"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as exc:
        raise ModelCardError(f"cannot convert the tokenizer of {what}: {exc}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ModelCardError(f"the tokenizer of {what} has no tokenizer.json form (not fast)")
    saved = {Path(file).name for file in tokenizer.save_pretrained(str(out))}
    if "tokenizer.json" not in saved or not (out / "tokenizer.json").is_file():
        raise ModelCardError(f"transformers wrote no tokenizer.json for {what}")
    return saved


def _cached_card(folder: Path, identity: str) -> ModelCard | None:
    if not (folder / MODEL_JSON).is_file():
        return None
    try:
        card = ModelCard.load(folder)
    except (ModelCardError, OSError):
        return None
    return card if card.identity == identity else None
