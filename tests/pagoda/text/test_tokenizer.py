"""pagoda's Tokenizer against transformers' AutoTokenizer on the same folders."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as Backend

from pagoda.text import Tokenizer

TEXTS = [
    "",
    "Hello world",
    "  leading and trailing  ",
    "What is the capital of France?",
    "12345 + 678 = 13023",
    "def f(x):\n\treturn x ** 2\n",
    "Les élèves étudient à l'école. Größe",
    "東京は日本の首都です。",
    "emoji 😀🎉👍🏽 and 🇫🇷",
    "special <s> and </s> and <|im_start|>user\nhi<|im_end|> inline",
    "multiple   spaces\n\n\nnewlines\r\n",
    "[CLS] hello [SEP] [MASK] [PAD]",
    "don't , it 's . ok ? yes !",
    "\u200bzero width and \ufffd replacement",
]


def _ids_to_check(tok: Tokenizer) -> list[list[int]]:
    rng = random.Random(0)
    ids = [tok.encode(t) for t in TEXTS]
    ids += [[rng.randrange(tok.vocab_size) for _ in range(n)] for n in (1, 7, 40, 200)]
    return ids


def test_matches_transformers(folder: Path, oracle: Callable[[Path], Any]) -> None:
    tok, hf = Tokenizer.from_dir(folder), oracle(folder)
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text), text
        assert tok.encode(text, add_special_tokens=False) == hf.encode(
            text, add_special_tokens=False
        ), text
    for ids in _ids_to_check(tok):
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(
            ids, skip_special_tokens=False
        )
        assert tok.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert tok.vocab_size == len(hf)
    assert tok.all_special_ids == hf.all_special_ids
    assert tok.all_special_tokens == hf.all_special_tokens
    assert tok.special_tokens_map == hf.special_tokens_map
    assert (tok.bos_token_id, tok.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    assert (tok.pad_token_id, tok.unk_token_id) == (hf.pad_token_id, hf.unk_token_id)
    assert tok.chat_template == hf.chat_template


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(max_size=60))
def test_random_text_matches_transformers(
    bytelevel_dir: Path, llama2_dir: Path, oracle: Callable[[Path], Any], text: str
) -> None:
    for folder in (bytelevel_dir, llama2_dir):
        tok, hf = _load(folder), oracle(folder)
        ids = tok.encode(text)
        assert ids == hf.encode(text)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)


_LOADED: dict[Path, Tokenizer] = {}


def _load(folder: Path) -> Tokenizer:
    if folder not in _LOADED:
        _LOADED[folder] = Tokenizer.from_dir(folder)
    return _LOADED[folder]


# -- what tokenizer_config.json and friends change ------------------------------------------

_TOKEN = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False}


def _added(content: str, special: bool = True, **flags: Any) -> dict[str, Any]:
    return {"content": content, **_TOKEN, "special": special, **flags}


VARIANTS: dict[str, dict[str, Any]] = {
    # transformers 5 ignores add_bos_token / add_eos_token when tokenizer.json exists:
    # the post-processor alone decides.
    "post_processor_wins": {
        "post_processor": "bos",
        "config": {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "add_bos_token": False,
            "add_eos_token": True,
        },
    },
    "add_bos_token_without_post_processor": {
        "config": {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True},
    },
    "named_token_not_in_vocab_is_added": {"config": {"bos_token": "<bos>", "eos_token": "</s>"}},
    "named_token_becomes_special": {
        "added": [AddedToken("<x>", special=False)],
        "config": {"bos_token": "<s>", "eos_token": "<x>"},
    },
    "added_tokens_decoder": {
        "config": {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "added_tokens_decoder": {
                "5": _added("<pad>", special=False, lstrip=True),
                "2000": _added("<x>"),
                "2001": _added("<y>", special=False),
            },
        },
    },
    "special_tokens_map_only": {
        "special_tokens_map": {
            "bos_token": "<s>",
            "eos_token": _added("</s>"),
            "additional_special_tokens": ["<z>"],
        },
    },
    "nothing_but_tokenizer_json": {},
    "extras_and_new_pad": {
        "config": {"eos_token": "</s>", "additional_special_tokens": ["<z>"], "pad_token": "<p>"}
    },
    "extra_special_tokens_list": {
        "config": {"eos_token": "</s>", "extra_special_tokens": ["<z>", "<|im_end|>"]}
    },
    "model_specific_token": {"config": {"eos_token": "</s>", "image_token": "<image>"}},
    "transformers4_config": {
        "post_processor": "bos",
        "config": {
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": {
                str(i): _added(t) for i, t in enumerate(["<unk>", "<s>", "</s>", "<|im_start|>"])
            },
            "bos_token": {"__type": "AddedToken", "content": "<s>", **_TOKEN},
            "eos_token": "<|im_end|>",
            "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
            "clean_up_tokenization_spaces": False,
            "legacy": False,
            "model_max_length": 2048,
            "tokenizer_class": "LlamaTokenizer",
        },
        "special_tokens_map": {"bos_token": "<x>", "eos_token": "</s>"},
    },
    "template_list": {
        "config": {
            "eos_token": "</s>",
            "chat_template": [
                {"name": "default", "template": "{{ messages[0]['content'] }}"},
                {"name": "tool_use", "template": "{{ tools | tojson }}"},
            ],
        }
    },
    "split_special_tokens": {
        "config": {"bos_token": "<s>", "eos_token": "</s>", "split_special_tokens": True}
    },
    "truncation_and_padding_in_tokenizer_json": {"truncate": True, "config": {"eos_token": "</s>"}},
}
VARIANT_TEXT = "hi <s> there <bos> </s> <x> <y> <z> <p> <pad> <image> <|im_end|> " + "end " * 20


@pytest.fixture(scope="session")
def variant_dirs(bytelevel_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = Backend.from_file(str(bytelevel_dir / "tokenizer.json"))
    dirs = {}
    for name, spec in VARIANTS.items():
        folder = tmp_path_factory.mktemp(name)
        tok = Backend.from_str(base.to_str())
        tok.post_processor = (
            processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
            if spec.get("post_processor") == "bos"
            else None
        )
        tok.add_tokens(spec.get("added", []))
        if spec.get("truncate"):
            tok.enable_truncation(max_length=4)
            tok.enable_padding(length=64, pad_id=5, pad_token="<pad>")
        tok.save(str(folder / "tokenizer.json"))
        for key, file in (
            ("config", "tokenizer_config.json"),
            ("special_tokens_map", "special_tokens_map.json"),
        ):
            if key in spec:
                (folder / file).write_text(json.dumps(spec[key]))
        dirs[name] = folder
    return dirs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_folder_variants_match_transformers(
    variant: str, variant_dirs: dict[str, Path], oracle: Callable[[Path], Any]
) -> None:
    folder = variant_dirs[variant]
    tok, hf = Tokenizer.from_dir(folder), oracle(folder)
    for special in (True, False):
        ids = tok.encode(VARIANT_TEXT, add_special_tokens=special)
        assert ids == hf.encode(VARIANT_TEXT, add_special_tokens=special)
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip
            )
    assert tok.vocab_size == len(hf)
    assert tok.all_special_ids == hf.all_special_ids
    assert tok.special_tokens_map == hf.special_tokens_map
    templates = hf.chat_template if isinstance(hf.chat_template, dict) else None
    assert tok.chat_templates == (
        templates or {"default": hf.chat_template} if hf.chat_template else {}
    )
    hf_max = hf.model_max_length if hf.model_max_length < 10**20 else None
    assert tok.model_max_length == hf_max


def test_bos_follows_the_post_processor(variant_dirs: dict[str, Path]) -> None:
    with_pp = Tokenizer.from_dir(variant_dirs["post_processor_wins"])
    without = Tokenizer.from_dir(variant_dirs["add_bos_token_without_post_processor"])
    assert with_pp.encode("end")[0] == with_pp.bos_token_id
    assert with_pp.encode("end")[-1] != with_pp.eos_token_id
    assert without.encode("end") == without.encode("end", add_special_tokens=False)


# -- EOS ids, errors ----------------------------------------------------------------------


def _copy(src: Path, dst: Path, keep: tuple[str, ...]) -> Path:
    dst.mkdir()
    for name in keep:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return dst


def test_eos_ids_come_from_tokenizer_and_generation_config(
    bytelevel_dir: Path, tmp_path: Path
) -> None:
    tok = Tokenizer.from_dir(bytelevel_dir)
    im_end = tok.convert_tokens_to_ids(["<|im_end|>"])[0]
    assert tok.eos_token_ids == [tok.eos_token_id, im_end]

    files = ("tokenizer.json", "tokenizer_config.json")
    only_config = _copy(bytelevel_dir, tmp_path / "config_json", files)
    (only_config / "config.json").write_text(json.dumps({"eos_token_id": [7, tok.eos_token_id]}))
    assert Tokenizer.from_dir(only_config).eos_token_ids == [tok.eos_token_id, 7]

    generation_wins = _copy(only_config, tmp_path / "both", (*files, "config.json"))
    (generation_wins / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert Tokenizer.from_dir(generation_wins).eos_token_ids == [tok.eos_token_id, 9]

    no_eos = _copy(bytelevel_dir, tmp_path / "none", ("tokenizer.json",))
    assert Tokenizer.from_dir(no_eos).eos_token_ids == []


def test_clear_errors(bytelevel_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        Tokenizer.from_dir(empty)
    (empty / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        Tokenizer.from_dir(empty)
    bad_config = _copy(bytelevel_dir, tmp_path / "bad_config", ("tokenizer.json",))
    (bad_config / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        Tokenizer.from_dir(bad_config)


def test_no_chat_template_is_a_value_error(metaspace_dir: Path) -> None:
    tok = Tokenizer.from_dir(metaspace_dir)
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


# -- the default model -----------------------------------------------------------------------


def test_smollm2(smollm2_dir: Path, oracle: Callable[[Path], Any]) -> None:
    tok, hf = Tokenizer.from_dir(smollm2_dir), oracle(smollm2_dir)
    digits = tok.encode("12345", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(digits) == list("12345")
    assert tok.vocab_size == 49152
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok.eos_token_ids == [tok.eos_token_id] == [2]
    assert len(tok.skipped_special_ids) == 17 and set(tok.all_special_ids) < tok.skipped_special_ids

    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(chat)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert prompt == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    hf_ids = hf.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    assert tok.encode(prompt, add_special_tokens=False) == hf_ids


def test_the_module_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys, pagoda.text; "
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'}); "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    root = Path(__file__).resolve().parents[3]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
