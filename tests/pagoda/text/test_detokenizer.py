"""IncrementalDetokenizer: streamed deltas add up to the text of the output tokens.

The text of the output tokens is what they add after the prompt:
``decode(prompt + output)[len(decode(prompt)):]``. Every prefix of the stream must be a
prefix of that text (no broken character is ever shown and later replaced), and the
stream plus ``flush()`` must be all of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagoda.text import IncrementalDetokenizer, Tokenizer

PROMPTS = [
    "",
    "The capital of France is",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "東京",
    "def f(x):\n    return",
    "[CLS] question [SEP]",
]
PIECES = ["😀", "🎉", "👍🏽", "🇫🇷", "東京", "é", "Привет", " world", "\n", " ", "\ufffd", "a"]
_LOADED: dict[Path, Tokenizer] = {}


def _load(folder: Path) -> Tokenizer:
    if folder not in _LOADED:
        _LOADED[folder] = Tokenizer.from_dir(folder)
    return _LOADED[folder]


def output_text(tok: Tokenizer, prompt: list[int], output: list[int], skip: bool) -> str:
    """The definition: what the output adds after the prompt."""
    whole = tok.backend.decode(prompt + output, skip_special_tokens=skip)
    before = tok.backend.decode(prompt, skip_special_tokens=skip)
    assert whole.startswith(before)
    return whole[len(before) :]


def stream(
    tok: Any, prompt: list[int], chunks: Sequence[list[int]], skip: bool = True
) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas = [detok.push(chunk) for chunk in chunks]
    return deltas, detok.flush()


_BYTE_TOKENS: dict[int, list[int]] = {}


def _byte_tokens(tok: Tokenizer) -> list[int]:
    """Ids of tokens that are one non-ASCII byte (byte-level alphabet or <0x..>)."""
    if id(tok) not in _BYTE_TOKENS:
        _BYTE_TOKENS[id(tok)] = [
            i
            for token, i in tok.backend.get_vocab().items()
            if (token.startswith("<0x") and int(token[3:5], 16) >= 0x80)
            or (len(token) == 1 and 0xA1 <= ord(token) <= 0x1FF)  # byte-level's 0x80-0xFF
        ] or [0]
    return _BYTE_TOKENS[id(tok)]


@st.composite
def cases(
    draw: st.DrawFn, tok: Tokenizer, random_ids: bool
) -> tuple[list[int], list[list[int]], bool]:
    """A prompt, an output split into pushes, and skip_special_tokens."""
    prompt = tok.encode(draw(st.sampled_from(PROMPTS)) + draw(st.text(max_size=8)))
    specials = sorted(tok.skipped_special_ids)
    if specials and draw(st.booleans()):
        prompt += [draw(st.sampled_from(specials))]
    parts = st.sampled_from(PIECES) | st.text(max_size=6)
    if random_ids:  # any id, lone bytes included: broken UTF-8 is fair game
        atoms = st.lists(
            st.integers(0, tok.vocab_size - 1)
            | st.sampled_from(_byte_tokens(tok))
            | parts.map(lambda s: tok.encode(s, add_special_tokens=False)),
            max_size=12,
        )
    else:  # whole encodings only (valid UTF-8 runs for byte-fallback decoders)
        atoms = st.lists(parts.map(lambda s: tok.encode(s, add_special_tokens=False)), max_size=8)
    output: list[int] = []
    for atom in draw(atoms):
        output += atom if isinstance(atom, list) else [atom]
        if specials and draw(st.integers(0, 9)) == 0:
            output.append(draw(st.sampled_from(specials)))
    cuts = sorted(draw(st.lists(st.integers(0, len(output)), max_size=len(output) + 1)))
    chunks = [output[a:b] for a, b in zip([0, *cuts], [*cuts, len(output)], strict=True)]
    return prompt, chunks, draw(st.booleans())


# Byte-level and Metaspace decoders decode each token on its own: any ids will do. Byte
# fallback decodes a run of byte tokens all or nothing, so a run broken for good turns
# earlier, complete characters of that run into U+FFFD too; there the outputs are whole
# encodings (see docs/text.md).
@pytest.mark.parametrize(
    ("name", "random_ids"),
    [
        ("bytelevel", True),
        ("smollm2", True),
        ("metaspace", True),
        ("wordpiece", True),
        ("llama2", False),
    ],
)
@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_stream_adds_up_to_the_output_text(
    name: str, random_ids: bool, request: pytest.FixtureRequest, data: st.DataObject
) -> None:
    tok = _load(request.getfixturevalue(f"{name}_dir"))
    prompt, chunks, skip = data.draw(cases(tok, random_ids))
    expected = output_text(tok, prompt, [i for c in chunks for i in c], skip)
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    shown = ""
    for chunk in chunks:
        shown += detok.push(chunk)
        assert expected.startswith(shown)
    assert shown + detok.flush() == expected


def test_emoji_and_cjk_split_over_tokens_are_held_back(smollm2_dir: Path) -> None:
    tok = _load(smollm2_dir)
    text = "Tokyo 東京 😀🎉👍🏽 café 🇫🇷"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # characters really are split over tokens
    deltas, rest = stream(tok, tok.encode("Say:"), [[i] for i in ids])
    assert rest == "" and "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas.count("") > 0  # some tokens were held until their character completed


@pytest.mark.parametrize("name", ["llama2", "metaspace"])
def test_sentencepiece_output_keeps_its_leading_space(
    name: str, request: pytest.FixtureRequest
) -> None:
    tok = _load(request.getfixturevalue(f"{name}_dir"))
    prompt = tok.encode("The capital of France is", add_special_tokens=False)
    output = tok.encode("Paris, of course.", add_special_tokens=False)
    assert tok.decode(output) == "Paris, of course."  # the decoder drops the first space
    deltas, rest = stream(tok, prompt, [[i] for i in output])
    assert "".join(deltas) + rest == " Paris, of course."
    assert tok.decode(prompt + output) == "The capital of France is Paris, of course."
    # Without a prompt there is nothing to be after: the text is decode(output).
    deltas, rest = stream(tok, [], [[i] for i in output])
    assert "".join(deltas) + rest == "Paris, of course."


def test_special_tokens_at_the_prompt_end(bytelevel_dir: Path) -> None:
    tok = _load(bytelevel_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    output = tok.encode("Hello there!<|im_end|>", add_special_tokens=False)
    for skip, expected in ((True, "Hello there!"), (False, "Hello there!<|im_end|>")):
        deltas, rest = stream(tok, prompt_ids, [[i] for i in output], skip=skip)
        assert "".join(deltas) + rest == expected


def test_spaces_between_special_tokens_changes_nothing(bytelevel_dir: Path) -> None:
    tok = _load(bytelevel_dir)
    output = tok.encode("a<|im_start|><|im_end|>b", add_special_tokens=False)
    for spaces in (True, False):
        detok = IncrementalDetokenizer(
            tok, [], skip_special_tokens=False, spaces_between_special_tokens=spaces
        )
        assert detok.push(output) + detok.flush() == "a<|im_start|><|im_end|>b"


class _CountingBackend:
    """Counts how many ids the detokenizer decodes, and the largest window."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self.decoded = 0
        self.widest = 0

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        self.decoded += len(ids)
        self.widest = max(self.widest, len(ids))
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)


class _CountingTokenizer:
    def __init__(self, tok: Tokenizer) -> None:
        self.backend = _CountingBackend(tok.backend)
        self.skipped_special_ids = tok.skipped_special_ids
        self.byte_continuation_ids = tok.byte_continuation_ids


def _cost(tok: Tokenizer, ids: list[int]) -> tuple[int, int]:
    """(ids decoded, widest window) to stream ``ids`` one at a time."""
    counting = _CountingTokenizer(tok)
    deltas, rest = stream(counting, tok.encode("Go:"), [[i] for i in ids])
    assert "".join(deltas) + rest == output_text(tok, tok.encode("Go:"), ids, True)
    return counting.backend.decoded, counting.backend.widest


@pytest.mark.parametrize(
    "text",
    [
        "Streaming text, one token at a time: 東京 😀 café.\n",
        "\ufffd",  # the replacement character itself, over and over
        "ä",  # byte 0xE4 of the byte-level alphabet: 3-byte characters that never complete
    ],
)
def test_cost_per_token_is_constant(bytelevel_dir: Path, text: str) -> None:
    tok = _load(bytelevel_dir)
    if text == "ä":
        ids = [tok.backend.token_to_id("ä")] * 200
    else:
        ids = tok.encode(text * 40, add_special_tokens=False)
    short, short_widest = _cost(tok, ids)
    long, long_widest = _cost(tok, ids * 4)
    assert long_widest == short_widest <= 24  # the window does not grow with the output
    assert long <= 4.4 * short


def test_empty_pushes_and_repeated_flush(bytelevel_dir: Path) -> None:
    tok = _load(bytelevel_dir)
    detok = IncrementalDetokenizer(tok, tok.encode("x"))
    assert detok.push([]) == ""
    assert detok.push(tok.encode("hello", add_special_tokens=False)) == "hello"
    assert detok.flush() == "" and detok.flush() == ""
    assert detok.push([]) == ""


def test_byte_fallback_runs_are_never_cut_inside_a_character(llama2_dir: Path) -> None:
    """A byte-fallback decoder shows a whole run of byte tokens as U+FFFD while any character
    in it is incomplete. Empty pushes in the meantime, and a long run, must not make the
    stream give up waiting and show a cut inside a character."""
    tok = _load(llama2_dir)
    byte = {int(t[3:5], 16): i for t, i in tok.backend.get_vocab().items() if t.startswith("<0x")}
    run = [byte[b] for b in ("\U00010000" * 3).encode()]  # 12 byte tokens, 3 characters
    word = tok.encode(" 0", add_special_tokens=False)
    chunks = [word, run[:1], *([[]] * 8), run[1:11], run[11:]]
    prompt = tok.encode("x")
    expected = output_text(tok, prompt, [t for c in chunks for t in c], skip=False)
    assert "\ufffd" not in expected
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=False)
    shown = ""
    for chunk in chunks:
        shown += detok.push(chunk)
        assert expected.startswith(shown), (shown, expected)
    assert shown + detok.flush() == expected
