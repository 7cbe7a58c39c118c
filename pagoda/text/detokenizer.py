"""Turn a stream of generated token ids into a stream of text deltas.

Decoding the whole output at every step costs O(length) per token, O(n²) per sequence;
decoding only the new token is wrong, because a token's text depends on its neighbours:
byte-level BPE splits one emoji or CJK character over several tokens, and SentencePiece
decoders drop the leading space of the first token they see. So, as vLLM does, each step
decodes a small window: the tokens already shown last time (the *prefix*, for context)
plus the new ones, and emits what the new ones add to the prefix's text. While that text
holds U+FFFD (an incomplete UTF-8 character; with byte-fallback decoders anywhere in a
run of byte tokens) it is held back until more tokens arrive.

The text of the output tokens is defined as the text they add after the prompt:
``decode(prompt + output)`` minus its first ``len(decode(prompt))`` characters, with the
same ``skip_special_tokens``. For byte-level tokenizers that is ``decode(output)``; for
SentencePiece-style ones it keeps the space before the first output word, which
``decode(output)`` alone would drop ("Paris" after "is" reads " Paris").
"""

from __future__ import annotations

from collections.abc import Sequence

from pagoda.text.tokenizer import Tokenizer

# Prompt tokens decoded as context before the first output token (vLLM uses 5 too).
_PROMPT_CONTEXT = 5
# One character is at most 4 UTF-8 bytes and every byte-level token holds at least one, so
# an incomplete character spans at most the last 4 tokens. When more than _MAX_HELD tokens
# have been held over more than _MAX_HELD pushes, the text is taken to hold broken bytes,
# and what lies 4 tokens back is shown (counting pushes too keeps one long push that ends
# inside a character from being mistaken for broken bytes).
_MAX_CHAR_TOKENS = 4
_MAX_HELD = 8
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Text deltas of one sequence; ``push`` new ids, ``flush`` once the sequence ends.

    Each push decodes O(new tokens + a few) ids, so a sequence costs O(1) amortized per
    token. ``spaces_between_special_tokens`` is accepted for vLLM compatibility; as in vLLM
    and transformers for tokenizer.json tokenizers, the tokenizer's decoder alone decides
    the spacing around special tokens, so it changes nothing.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self._backend = tokenizer.backend
        # Skipped special tokens decode to nothing: drop them up front, so they never
        # take the place of the context a SentencePiece decoder needs.
        self._skipped = tokenizer.skipped_special_ids if skip_special_tokens else frozenset()
        self._continuations = tokenizer.byte_continuation_ids
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        context = self._context(prompt_token_ids)
        # _tokens[:_read] is shown (or prompt); _tokens[_read:] is held back.
        self._tokens = context
        self._read = len(context)
        self._prefix_text = self._decode(context)
        self._held_pushes = 0

    def push(self, new_token_ids: Sequence[int]) -> str:
        """The text that ``new_token_ids`` add, minus any incomplete character at the end
        (it comes out with a later push or with ``flush``)."""
        new = self._kept(new_token_ids)
        if not new:  # nothing added: no reason to decode, nor to count a held push
            return ""
        self._tokens.extend(new)
        text = self._decode(self._tokens)
        # Show the new text only once it holds no U+FFFD anywhere and still extends what
        # was shown: a byte-fallback decoder turns a whole run of byte tokens into U+FFFD
        # while any character in it is incomplete, so the replacement can sit mid-text.
        if (
            text.startswith(self._prefix_text)
            and _REPLACEMENT not in text[len(self._prefix_text) :]
        ):
            return self._emit(text, len(self._tokens))
        self._held_pushes += 1
        if self._held_pushes > _MAX_HELD and len(self._tokens) - self._read > _MAX_HELD:
            return self._emit_complete_part(text)
        return ""

    def flush(self) -> str:
        """Release what is held back, even an incomplete character (shown as U+FFFD, as a
        one-shot decode shows it), when the sequence has ended."""
        if len(self._tokens) == self._read:
            return ""
        return self._emit(self._decode(self._tokens), len(self._tokens))

    def _emit(self, text: str, upto: int) -> str:
        """Show ``self._tokens[:upto]`` whose text is ``text``; they become the prefix."""
        delta = text[len(self._prefix_text) :]
        if not delta:
            return ""
        self._tokens = self._tokens[self._read :]
        upto -= self._read
        self._read = upto
        self._prefix_text = self._decode(self._tokens[:upto])
        self._held_pushes = 0
        return delta

    def _emit_complete_part(self, text: str) -> str:
        """Many tokens held and the text still ends in U+FFFD: it holds broken bytes or
        literal U+FFFD characters, not only a character being completed. A UTF-8 byte's
        text depends on at most the 3 bytes after it, so the text 4 tokens back is final:
        show it, at a token boundary where it agrees with ``text``, so that no output can
        grow the window without bound."""
        if not text.startswith(self._prefix_text):
            return ""
        first = len(self._tokens) - _MAX_CHAR_TOKENS
        for end in range(first, first - _MAX_CHAR_TOKENS, -1):
            shown = self._decode(self._tokens[:end])
            # Never cut inside a character spelled in byte-fallback tokens: such a decoder
            # shows a whole run as replacements while any character in it is incomplete.
            if self._tokens[end] in self._continuations or not text.startswith(shown):
                continue
            if delta := self._emit(shown, end):
                return delta
        return ""

    def _context(self, prompt: Sequence[int]) -> list[int]:
        """The last few kept prompt tokens, without copying a long prompt."""
        context: list[int] = []
        for i in range(len(prompt) - 1, -1, -1):
            if len(context) == _PROMPT_CONTEXT:
                break
            if prompt[i] not in self._skipped:
                context.append(int(prompt[i]))
        return context[::-1]

    def _kept(self, ids: Sequence[int]) -> list[int]:
        if not self._skipped:
            return list(ids)
        return [i for i in ids if i not in self._skipped]

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=False)
