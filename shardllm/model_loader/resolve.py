"""Turn what the user named as `model` into a config, a load format and files.

Accepted: None (the embedded default), a `.gguf` file, a checkpoint directory in HF layout, a name of a
config shipped with the package (`llama-3-70b`, or its HF repo id) for `load_format="dummy"`, or an HF
repo id resolved through huggingface_hub (local cache first, download where the network allows).
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Any

from shardllm.model_loader.default_model import DEFAULT_MODEL_NAME, default_model_path

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")

# Shipped configs (public facts) and the HF repo ids that name them.
SHIPPED_CONFIGS: dict[str, list[str]] = {
    "llama-3-8b": ["meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B-Instruct",
                   "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct"],
    "llama-3-70b": ["meta-llama/Meta-Llama-3-70B", "meta-llama/Meta-Llama-3-70B-Instruct",
                    "meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.1-70B-Instruct"],
    "llama-3-405b": ["meta-llama/Meta-Llama-3-405B", "meta-llama/Meta-Llama-3.1-405B",
                     "meta-llama/Llama-3.1-405B", "meta-llama/Llama-3.1-405B-Instruct"],
    "mixtral-8x7b": ["mistralai/Mixtral-8x7B-v0.1", "mistralai/Mixtral-8x7B-Instruct-v0.1",
                     "mistralai/Mixtral-8x7B"],
    "mixtral-8x22b": ["mistralai/Mixtral-8x22B-v0.1", "mistralai/Mixtral-8x22B-Instruct-v0.1",
                      "mistralai/Mixtral-8x22B"],
}


@dataclass
class ResolvedModel:
    name: str
    hf_config: Any
    load_format: str
    path: str | None
    tokenizer_path: str | None


def shipped_config_name(model: str) -> str | None:
    key = model.lower()
    for name, aliases in SHIPPED_CONFIGS.items():
        if key == name or key in (a.lower() for a in aliases):
            return name
    return None


def load_shipped_config(name: str):
    from transformers import AutoConfig

    with open(os.path.join(_CONFIG_DIR, f"{name}.json")) as f:
        d = json.load(f)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def resolve_model(model: str | None, load_format: str = "auto", trust_remote_code: bool = False) -> ResolvedModel:
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}: choose one of {list(LOAD_FORMATS)}")
    if model is None or model in ("default", DEFAULT_MODEL_NAME):
        model_path = default_model_path()
        return _resolve_gguf(model_path, DEFAULT_MODEL_NAME, load_format)
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a path, a Hugging Face repo id or None, got {model!r}")
    if model.endswith(".gguf"):
        if not os.path.isfile(model):
            raise ValueError(f"GGUF file {model!r} does not exist")
        return _resolve_gguf(model, model, load_format)
    if os.path.isdir(model):
        return _resolve_dir(model, model, load_format, trust_remote_code)
    shipped = shipped_config_name(model)
    if shipped is not None and load_format == "dummy":
        return ResolvedModel(model, load_shipped_config(shipped), "dummy", None, None)
    looks_local = model.startswith((".", "~")) or os.path.isabs(model)  # "./m", "../m", "~/m": never a repo id
    if looks_local or os.path.sep in model and model.count("/") != 1 or os.path.exists(model):
        raise ValueError(f"model path {model!r} does not exist or is not a checkpoint directory")
    if "/" not in model:
        raise ValueError(
            f"unknown model {model!r}: pass a checkpoint directory, a .gguf file, a Hugging Face repo id, "
            f"or (with load_format='dummy') one of the shipped configs {sorted(SHIPPED_CONFIGS)}")
    return _resolve_dir(_download(model, shipped), model, load_format, trust_remote_code)


def _download(repo_id: str, shipped: str | None) -> str:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except Exception:
        pass
    try:
        return snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as e:
        hint = (f" For a benchmark without weights use load_format='dummy' (config {shipped!r} ships with "
                "shardllm)." if shipped else "")
        raise ValueError(f"could not find {repo_id!r} in the Hugging Face cache nor download it "
                         f"({type(e).__name__}: {e}). Pass a local checkpoint directory instead.{hint}") from e


def _resolve_dir(path: str, name: str, load_format: str, trust_remote_code: bool) -> ResolvedModel:
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(path, "config.json")):
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if ggufs and load_format in ("auto", "gguf"):
            return _resolve_gguf(ggufs[0], name, load_format)
        raise ValueError(f"{path!r} has no config.json: not a Hugging Face checkpoint directory")
    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ValueError(f"could not read {os.path.join(path, 'config.json')}: {e}") from e
    if load_format == "auto":
        load_format = "safetensors"
    if load_format == "gguf":
        raise ValueError(f"load_format='gguf' needs a .gguf file, got the directory {path!r}")
    if load_format == "safetensors" and not glob.glob(os.path.join(path, "*.safetensors")):
        if glob.glob(os.path.join(path, "*.bin")) or glob.glob(os.path.join(path, "*.pt")):
            raise ValueError(f"{path!r} holds only pickle checkpoints (.bin/.pt), which shardllm never loads: "
                             "convert them to safetensors")
        raise ValueError(f"no *.safetensors files in {path!r}: the checkpoint is incomplete "
                         "(or use load_format='dummy' for random weights)")
    has_tok = any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
    return ResolvedModel(name, hf_config, load_format, path, path if has_tok else None)


def _resolve_gguf(path: str, name: str, load_format: str) -> ResolvedModel:
    from transformers import AutoConfig

    from shardllm.model_loader.gguf import gguf_to_hf_config, open_gguf

    if load_format == "safetensors":
        raise ValueError(f"{path!r} is a GGUF file: use load_format='gguf' or 'auto'")
    d = gguf_to_hf_config(open_gguf(path))
    hf_config = AutoConfig.for_model(d.pop("model_type"), **d)
    return ResolvedModel(name, hf_config, "dummy" if load_format == "dummy" else "gguf", path, path)
