"""Stop strings over streamed text.

A stop string can arrive split over several deltas, and a client must never see text
that a stop string later removes. So text that could still be the start of a stop string
is held back until it is either completed (then cut) or ruled out (then shown).

Which stop string wins: the first one to be *completed* when the text is read left to
right, and among those completed at the same character the longest (it starts first).
That is what a stream can decide the moment the stop string's last character arrives,
without waiting for tokens the model should not generate; and it does not depend on how
the text was split into deltas. With ``include_stop_str_in_output`` the output ends after
the stop string, otherwise before it; text after it is dropped either way.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopChecker:
    """Feed successive text deltas to ``push``; ``flush`` at EOS or length."""

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        if isinstance(stop, str):
            stop = [stop]
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError("stop strings must be non-empty strings")
        self._stops = tuple(dict.fromkeys(stop))
        self._include = include_stop_str_in_output
        # The last (longest stop - 1) characters seen: a stop string completed by the next
        # delta starts within them.
        self._context_len = max((len(s) for s in self._stops), default=1) - 1
        # A held tail ends with one of these (a stop string's character, not its last).
        self._tail_chars = frozenset(c for s in self._stops for c in s[:-1])
        self._seen_tail = ""
        self._held = ""
        self.matched: str | None = None

    @property
    def stopped(self) -> bool:
        """A stop string was found; the sequence should finish with reason "stop"."""
        return self.matched is not None

    @property
    def held_text(self) -> str:
        """Text received but not yet shown, because it may start a stop string."""
        return self._held

    def push(self, delta: str) -> str:
        """The text that can be shown now. Once a stop string is found it returns the text
        up to it (or through it), sets ``matched``, and returns "" for later deltas."""
        if self.stopped or not delta:
            return ""
        window = self._seen_tail + delta
        unshown = self._held + delta
        # `unshown` is an end of `window`: the held text is shorter than any stop string.
        unshown_at = len(window) - len(unshown)
        match = self._first_match(window, new_from=len(self._seen_tail))
        if match is not None:
            stop, start = match
            self.matched = stop
            self._held = ""
            cut = start + len(stop) if self._include else start
            return unshown[: cut - unshown_at]
        hold = 0 if self._include else self._partial_match_len(window)
        self._seen_tail = window[-self._context_len :] if self._context_len else ""
        self._held = unshown[len(unshown) - hold :] if hold else ""
        return unshown[: len(unshown) - hold]

    def flush(self) -> str:
        """Release the held text when the sequence ends for another reason (EOS, length)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _first_match(self, window: str, new_from: int) -> tuple[str, int] | None:
        """The stop string completed first (ties: longest) among those ending after
        ``new_from``, with its start in ``window``. Earlier ones were checked before."""
        best: tuple[int, int, str] | None = None  # (end, -length, stop)
        for stop in self._stops:
            start = window.find(stop, max(0, new_from - len(stop) + 1))
            if start < 0:
                continue
            key = (start + len(stop), -len(stop), stop)
            if best is None or key < best:
                best = key
        if best is None:
            return None
        end, neg_len, stop = best
        return stop, end + neg_len

    def _partial_match_len(self, window: str) -> int:
        """Length of the longest end of ``window`` that begins some stop string: the
        shortest tail that must be held back so no shown text is later cut."""
        if window[-1] not in self._tail_chars:
            return 0
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(window)), longest, -1):
                if window.endswith(stop[:n]):
                    longest = n
                    break
        return longest
