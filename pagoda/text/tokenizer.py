"""A torch-free tokenizer that reads a Hugging Face tokenizer folder.

The gateway tokenizes and detokenizes but must never import torch, and transformers
imports torch whenever it is installed. So this class reads the folder itself with the
``tokenizers`` library and reproduces what transformers 5's ``AutoTokenizer`` does with
the same folder: the same ids from ``encode``, the same text from ``decode``, the same
chat prompt from ``apply_chat_template``. The folder rules it follows are in
:mod:`pagoda.text.tokenizer_files`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from os import PathLike
from typing import Any

from tokenizers import Tokenizer as Backend

from pagoda.text.chat_template import ChatTemplate, select_template
from pagoda.text.tokenizer_files import TokenizerFiles, read_tokenizer_files


class Tokenizer:
    """Text ⇄ token ids, special tokens, EOS ids and the chat template of one model."""

    def __init__(self, files: TokenizerFiles) -> None:
        self._files = files
        self._backend = files.backend
        self._special_tokens = dict(files.special_tokens)
        self._eos_token_ids = list(files.eos_token_ids)
        self._all_special_tokens = list(
            dict.fromkeys([*self._special_tokens.values(), *files.extra_special_tokens])
        )
        self._all_special_ids = self._ids_of(self._all_special_tokens)
        self._skipped_special_ids = frozenset(
            i for i, t in self._backend.get_added_tokens_decoder().items() if t.special
        )
        # transformers skips its cleanup for BPE models: it would eat spaces before punctuation.
        self._clean_up_spaces = files.clean_up_tokenization_spaces and (
            type(self._backend.model).__name__ != "BPE" or files.clean_up_even_for_bpe
        )

    @classmethod
    def from_dir(cls, path: str | PathLike[str]) -> Tokenizer:
        """Load a tokenizer folder (``tokenizer.json`` and its companions).

        Raises ``FileNotFoundError`` when the folder or its ``tokenizer.json`` is missing and
        ``ValueError`` when a file cannot be parsed.
        """
        return cls(read_tokenizer_files(path))

    # -- encoding and decoding -------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; the post-processor in tokenizer.json decides BOS/EOS."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``. Unlike transformers, special tokens are skipped by default, as
        in vLLM's outputs, since that is what a client wants to read."""
        text = self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up_spaces else text

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        """Vocabulary strings of ``ids`` (``None`` for an id outside the vocabulary)."""
        return [self._backend.id_to_token(int(i)) for i in ids]

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int | None]:
        """Ids of vocabulary strings (``None`` for a string that is not a token)."""
        return [self._backend.token_to_id(t) for t in tokens]

    # -- vocabulary and special tokens -----------------------------------------------------

    @property
    def backend(self) -> Backend:
        """The ``tokenizers.Tokenizer`` underneath, for callers that batch or stream."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (``len()`` of a transformers tokenizer)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens (``bos_token``, ``eos_token``, ...); chat templates see them."""
        return dict(self._special_tokens)

    @property
    def bos_token(self) -> str | None:
        return self._special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special_tokens.get("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of_named("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's own EOS; the model may stop on more ids, see ``eos_token_ids``."""
        return self._id_of_named("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._id_of_named("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._id_of_named("unk_token")

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends a sequence: the tokenizer's EOS first, then those of
        generation_config.json (or config.json), since chat models often stop on several."""
        return list(self._eos_token_ids)

    @property
    def all_special_tokens(self) -> list[str]:
        """Named and extra special tokens, as transformers lists them."""
        return list(self._all_special_tokens)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of ``all_special_tokens`` (transformers' ``all_special_ids``)."""
        return list(self._all_special_ids)

    @property
    def skipped_special_ids(self) -> frozenset[int]:
        """Ids that ``decode(skip_special_tokens=True)`` drops: every added token marked
        special, a superset of ``all_special_ids`` (SmolLM2 has 17 such tokens, 3 named)."""
        return self._skipped_special_ids

    @cached_property
    def byte_continuation_ids(self) -> frozenset[int]:
        """Byte-fallback tokens (``<0x80>`` .. ``<0xBF>``) that continue a UTF-8 character:
        text cut just before one of them is cut inside a character."""
        ids = []
        for token, i in self._backend.get_vocab(with_added_tokens=False).items():
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                try:
                    value = int(token[3:5], 16)
                except ValueError:
                    continue
                if 0x80 <= value <= 0xBF:
                    ids.append(i)
        return frozenset(ids)

    @property
    def model_max_length(self) -> int | None:
        """``model_max_length`` of tokenizer_config.json; ``None`` when absent or the
        transformers placeholder for "no limit"."""
        return self._files.model_max_length

    # -- chat ------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """The default chat template source, or ``None`` when the model has none."""
        templates = self._files.chat_templates
        return templates.get("default") if templates else None

    @property
    def chat_templates(self) -> dict[str, str]:
        """Every named template (``default``, ``tool_use``, ...)."""
        return dict(self._files.chat_templates)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        continue_final_message: bool | str = False,
        *,
        documents: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation to the prompt text, as transformers'
        ``apply_chat_template(..., tokenize=False)``.

        ``chat_template`` is a template name or a template source that overrides the
        model's. Extra keyword arguments become template variables and win over the special
        tokens. A missing template, a template error or a bad conversation raises
        ``ValueError``.
        """
        source = select_template(self._files.chat_templates, chat_template, tools)
        return ChatTemplate(source).render(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            documents=documents,
            **{**self._special_tokens, **kwargs},
        )

    # -- helpers ---------------------------------------------------------------------------

    def _id_of_named(self, name: str) -> int | None:
        token = self._special_tokens.get(name)
        return None if token is None else self._backend.token_to_id(token)

    def _ids_of(self, tokens: list[str]) -> list[int]:
        ids = (self._backend.token_to_id(t) for t in tokens)
        return [i for i in ids if i is not None]


def _clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization``, for WordPiece-era configs that ask for it."""
    for before, after in _CLEAN_UPS:
        text = text.replace(before, after)
    return text


_CLEAN_UPS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)
