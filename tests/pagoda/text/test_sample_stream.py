"""SampleStream: one sample's tokens, text, stop strings, logprobs and deltas."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagoda.sampling_params import SamplingParams
from pagoda.text import SampleStream, Tokenizer
from pagoda.v1 import common_pb2


@pytest.fixture(scope="module")
def tok(bytelevel_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(bytelevel_dir)


def _stream(tok: Tokenizer, **params: object) -> SampleStream:
    return SampleStream.start(0, tok, tok.encode("Say:"), SamplingParams(**params))


def _feed(sample: SampleStream, ids: list[int]) -> tuple[list[str], str | None]:
    """Push ids one by one, collecting text deltas, until a stop string matches."""
    texts = []
    for token in ids:
        matched = sample.add_token(token)
        if (delta := sample.take_delta()) is not None:
            texts.append(delta.text)
        if matched is not None:
            sample.finish("stop", matched)
            return texts, matched
    return texts, None


def test_deltas_add_up_to_the_text_and_never_show_a_broken_character(tok: Tokenizer) -> None:
    text = " Grüße 😀🎉 and 東京 done."
    ids = tok.encode(text, add_special_tokens=False)
    sample = _stream(tok)
    texts, matched = _feed(sample, ids)
    sample.finish("length", None)
    tail = sample.take_delta()
    assert matched is None and tail is not None and tail.finish_reason == "length"
    assert "".join(texts) + tail.text == sample.text == text
    assert not any("\ufffd" in t for t in texts)
    assert sample.take_delta() is None  # the finish is reported once


def test_a_stop_string_cuts_the_text_and_later_tokens_are_dropped(tok: Tokenizer) -> None:
    ids = tok.encode(" one two STOP three four", add_special_tokens=False)
    sample = _stream(tok, stop=["STOP"])
    texts, matched = _feed(sample, ids)
    assert matched == "STOP"
    assert sample.text == " one two " and "".join(texts) == " one two "
    kept = list(sample.token_ids)
    assert sample.add_token(ids[-1]) is None and sample.token_ids == kept
    assert sample.finish_reason == "stop" and sample.stop_reason == "STOP"


def test_include_stop_str_in_output_keeps_the_stop_string(tok: Tokenizer) -> None:
    ids = tok.encode(" one two STOP three", add_special_tokens=False)
    sample = _stream(tok, stop=["STOP"], include_stop_str_in_output=True)
    _, matched = _feed(sample, ids)
    assert matched == "STOP" and sample.text == " one two STOP"


def test_text_held_for_a_possible_stop_string_is_released_at_the_end(tok: Tokenizer) -> None:
    ids = tok.encode(" one ST", add_special_tokens=False)
    sample = _stream(tok, stop=["STOP"])
    texts, _ = _feed(sample, ids)
    assert "".join(texts) == " one "
    sample.finish("length", None)
    assert sample.take_delta().text == "ST"  # type: ignore[union-attr]
    assert sample.text == " one ST"


def test_logprobs_beyond_the_tokens_are_dropped(tok: Tokenizer) -> None:
    sample = _stream(tok, logprobs=1)
    sample.add_token(5)
    entries = [common_pb2.TokenLogprobs(token_id=5, logprob=-1.0)] * 2
    sample.add_logprobs(entries)
    delta = sample.take_delta()
    assert delta is not None and len(delta.logprobs) == 1 and delta.token_ids == [5]


def test_without_detokenizing_only_token_ids_are_kept(tok: Tokenizer) -> None:
    sample = SampleStream.start(0, tok, [1, 2], SamplingParams(detokenize=False))
    for token in tok.encode("hello world", add_special_tokens=False):
        assert sample.add_token(token) is None
    sample.finish("length", None)
    delta = sample.take_delta()
    assert delta is not None and delta.text == "" and sample.text == ""
    assert delta.token_ids == tok.encode("hello world", add_special_tokens=False)


def test_without_a_tokenizer_only_token_ids_are_kept() -> None:
    sample = SampleStream.start(1, None, [1, 2], SamplingParams())
    assert sample.add_token(7) is None
    delta = sample.take_delta()
    assert delta is not None and (delta.index, delta.text, delta.token_ids) == (1, "", [7])
