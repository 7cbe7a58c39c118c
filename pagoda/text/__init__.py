"""Text: tokenizer, chat templates, incremental detokenizer and stop strings.

Torch-free (only the stdlib, ``tokenizers`` and ``jinja2``), so the gateway can use it;
the offline ``pagoda.LLM`` uses the same classes. See docs/text.md.
"""

from pagoda.text.chat_template import ChatTemplate
from pagoda.text.detokenizer import IncrementalDetokenizer
from pagoda.text.stop import StopChecker
from pagoda.text.tokenizer import Tokenizer

__all__ = ["ChatTemplate", "IncrementalDetokenizer", "StopChecker", "Tokenizer"]
