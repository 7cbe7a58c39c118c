"""pagoda: LLM serving split into a gateway, a scheduler and workers that scale on their own.

``from pagoda import LLM, SamplingParams`` gives the offline engine, as in vLLM.
Importing this package never imports torch: ``LLM`` (which does) is loaded on first
use, and the services import submodules (``pagoda.v1``, ``pagoda.text``, ...) only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pagoda.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagoda.entrypoints.llm import LLM
    from pagoda.outputs import CompletionOutput, RequestOutput

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "__version__"]

_LAZY = {
    "LLM": "pagoda.entrypoints.llm",
    "RequestOutput": "pagoda.outputs",
    "CompletionOutput": "pagoda.outputs",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pagoda' has no attribute {name!r}")
