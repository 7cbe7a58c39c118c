"""StopChecker: streamed stop strings give what checking the whole text at once gives."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagoda.text import StopChecker


def reference(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """The whole text at once: the stop string completed first (ties: the longest)."""
    found = [(text.find(s) + len(s), -len(s), s) for s in stops if s in text]
    if not found:
        return text, None
    end, neg_len, stop = min(found)
    return text[: end if include else end + neg_len], stop


def run(deltas: list[str], stops: list[str], include: bool = False) -> tuple[list[str], str]:
    checker = StopChecker(stops, include)
    shown = [checker.push(d) for d in deltas]
    return shown, checker.flush()


def test_stop_inside_one_delta() -> None:
    shown, rest = run(["Hello world. Bye"], ["."])
    assert shown == ["Hello world"] and rest == ""
    shown, rest = run(["Hello world. Bye"], ["."], include=True)
    assert shown == ["Hello world."]


def test_stop_spanning_deltas_is_held_then_cut() -> None:
    checker = StopChecker(["</answer>"])
    assert checker.push("42 </an") == "42 "
    assert checker.held_text == "</an"
    assert checker.push("swer> and more") == ""
    assert checker.matched == "</answer>" and checker.stopped
    assert checker.push("ignored") == "" and checker.flush() == ""


def test_false_start_is_released() -> None:
    checker = StopChecker(["STOP"])
    assert checker.push("a ST") == "a "
    assert checker.push("O") == ""
    assert checker.push("P!") == ""
    assert checker.stopped

    checker = StopChecker(["STOP"])
    assert checker.push("a ST") == "a "
    assert checker.push("OMP") == "STOMP"
    assert checker.held_text == "" and not checker.stopped


def test_held_text_comes_out_at_the_end() -> None:
    checker = StopChecker(["\n\nUser:"])
    assert checker.push("The answer.\n\nUs") == "The answer."
    assert checker.flush() == "\n\nUs"
    assert checker.flush() == ""


def test_include_stop_string_holds_nothing() -> None:
    checker = StopChecker(["###"], include_stop_str_in_output=True)
    assert checker.push("a #") == "a #"
    assert checker.push("#") == "#"
    assert checker.push("# tail") == "#"
    assert checker.matched == "###"


def test_first_completed_wins_then_longest() -> None:
    # "b" completes before "abc" does.
    assert run(["xabcd"], ["abc", "b"]) == (["xa"], "")
    assert run(["xa", "bcd"], ["abc", "b"]) == (["x", "a"], "")
    # "abc" and "bc" complete together: the longer (earlier) one wins.
    for deltas in (["xabcd"], ["xab", "cd"], ["x", "a", "b", "c", "d"]):
        checker = StopChecker(["bc", "abc"])
        assert "".join(checker.push(d) for d in deltas) == "x"
        assert checker.matched == "abc"


def test_overlapping_prefixes() -> None:
    # "aab" must be found in "aaab" even though the first "aa" is a false start.
    assert "".join(run(["a", "a", "a", "b", "c"], ["aab"])[0]) == "a"
    assert "".join(run(["aa", "aab"], ["aab"])[0]) == "aa"


def test_stop_at_the_very_start_and_no_stops() -> None:
    assert run(["Stop", " here"], ["Stop"]) == (["", ""], "")
    assert run(["any", " text"], []) == (["any", " text"], "")
    assert StopChecker("END").push("the END") == "the "


def test_empty_stop_string_is_refused() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopChecker(["ok", ""])


@st.composite
def split(draw: st.DrawFn, text: str) -> list[str]:
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=8)))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


ALPHABET = "ab \n."


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(ALPHABET, max_size=24),
    stops=st.lists(st.text(ALPHABET, min_size=1, max_size=4), max_size=3),
    include=st.booleans(),
    data=st.data(),
)
def test_any_split_gives_the_whole_text_result(
    text: str, stops: list[str], include: bool, data: st.DataObject
) -> None:
    expected, matched = reference(text, stops, include)
    checker = StopChecker(stops, include)
    shown, seen = "", ""
    for delta in data.draw(split(text)):
        shown += checker.push(delta)
        seen += delta
        # Nothing shown is ever cut later ...
        assert expected.startswith(shown)
        if not checker.stopped and not include:
            # ... and only the longest end that may start a stop string is held back.
            hold = max(
                (n for s in stops for n in range(1, len(s)) if seen.endswith(s[:n])), default=0
            )
            assert len(shown) == len(seen) - hold
    shown += checker.flush()
    assert shown == expected
    assert checker.matched == matched
