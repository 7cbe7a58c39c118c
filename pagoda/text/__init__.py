"""Text: tokenizer, chat templates, incremental detokenizer and stop strings.

Torch-free (only the stdlib, ``tokenizers`` and ``jinja2``), so the gateway can use it;
the offline ``pagoda.LLM`` uses the same classes, ``SampleStream`` (one sample's tokens,
text, stop strings and logprobs) among them. See docs/text.md.
"""

from pagoda.text.chat_template import ChatTemplate
from pagoda.text.detokenizer import IncrementalDetokenizer
from pagoda.text.sample_stream import SampleDelta, SampleStream
from pagoda.text.stop import StopChecker
from pagoda.text.tokenizer import Tokenizer

__all__ = [
    "ChatTemplate",
    "IncrementalDetokenizer",
    "SampleDelta",
    "SampleStream",
    "StopChecker",
    "Tokenizer",
]
