"""The engine-style API: one object that holds a compression setting and a calibration, and
calibrates, generates, compresses prefixes and reports memory for Hugging Face causal LMs."""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from spectralquant.adapters.hf_cache_argument import returned_cache, with_cache

from spectralquant import api
from spectralquant.calibration import Calibration
from spectralquant.config import CompressionConfig, resolve_config

from .hf_cache import CompressionStats, SpectralQuantCache


@dataclass
class GenerationResult:
    """Generated ``text`` (prompt excluded), token counts, wall time and the cache's memory figures."""

    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    stats: CompressionStats

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def ratio(self) -> float:
        return self.stats.ratio


class SpectralQuant:
    """Compression preset + dials + calibration, applied to any supported causal LM.

    >>> engine = SpectralQuant("standard", window=64)
    >>> engine.calibrate(model, tokenizer)
    >>> result = engine.generate(model, tokenizer, "Once upon a time", max_new_tokens=40)
    >>> result.text, result.ratio, result.tokens_per_second
    """

    def __init__(self, compression: str | CompressionConfig = "standard", fused: bool | None = None, **dials):
        self.config = resolve_config(compression, **dials)
        self.fused = fused
        self.calibration: Calibration | None = None
        self._last_stats: CompressionStats | None = None

    def calibrate(self, model, tokenizer, texts=None, **options) -> Calibration:
        """Calibrate on ``texts`` (default: the bundled corpus) and keep the result."""
        self.calibration = api.calibrate(model, tokenizer, texts, **options)
        return self.calibration

    def save_calibration(self, path) -> None:
        self._require_calibration().save(path)

    def load_calibration(self, path) -> Calibration:
        self.calibration = Calibration.load(path)
        return self.calibration

    def _require_calibration(self) -> Calibration:
        if self.calibration is None:
            raise ValueError(
                "no calibration yet: call engine.calibrate(model, tokenizer) or engine.load_calibration(path)"
            )
        return self.calibration

    @contextmanager
    def _wrapped(self, model):
        """The model wrapped with this engine's setting for the duration (an already wrapped model
        is used as it is)."""
        if api.is_wrapped(model):
            yield
            return
        api.wrap(model, self._require_calibration(), preset=self.config, fused=self.fused)
        try:
            yield
        finally:
            api.unwrap(model)

    @torch.inference_mode()
    def compress_prefill(self, model, tokenizer, prefix: str) -> SpectralQuantCache:
        """Run ``prefix`` through the model and return its compressed cache. Pass it to
        :meth:`generate` as ``prefix_cache`` (it is copied, so it can be reused) with prompts that
        start with ``prefix``."""
        ids = tokenizer(prefix, return_tensors="pt").input_ids.to(next(model.parameters()).device)
        with self._wrapped(model):
            out = model(input_ids=ids, use_cache=True)
        cache = returned_cache(out)
        self._last_stats = cache.compression_stats()
        return cache

    @torch.inference_mode()
    def generate(
        self,
        model,
        tokenizer,
        prompt: str,
        max_new_tokens: int = 64,
        prefix_cache: SpectralQuantCache | None = None,
        **generate_kwargs,
    ) -> GenerationResult:
        """Generate from ``prompt`` with a compressed cache (greedy unless ``do_sample=True`` etc.)."""
        inputs = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
        n_prompt = inputs.input_ids.shape[1]
        if prefix_cache is not None:
            if prefix_cache.get_seq_length() >= n_prompt:
                raise ValueError("the prompt must extend the prefix that prefix_cache holds")
            generate_kwargs.update(with_cache(model, copy.deepcopy(prefix_cache)))
        generate_kwargs.setdefault("do_sample", False)
        generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id or tokenizer.eos_token_id)
        with self._wrapped(model):
            start = time.perf_counter()
            out = model.generate(
                **inputs, max_new_tokens=max_new_tokens, return_dict_in_generate=True, **generate_kwargs
            )
            if torch.cuda.is_available() and inputs.input_ids.is_cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        new = out.sequences[0, n_prompt:]
        self._last_stats = returned_cache(out).compression_stats()
        return GenerationResult(
            text=tokenizer.decode(new, skip_special_tokens=True),
            prompt_tokens=n_prompt,
            new_tokens=int(new.numel()),
            seconds=seconds,
            stats=self._last_stats,
        )

    def compression_stats(self) -> CompressionStats:
        """Memory figures of the cache of the last :meth:`generate` or :meth:`compress_prefill`."""
        if self._last_stats is None:
            raise ValueError("nothing has been generated or compressed yet")
        return self._last_stats
