"""Hugging Face decoder-only LMs: Llama, Gemma 2/3, Qwen2, Mistral, Phi-3.

K/V are captured exactly as attention reads them from transformers' cache (post-RoPE, after any
key norm), per KV head (GQA: never per query head), by running calibration text through the
model with a capturing attention function. By default each token's contribution to its head's
statistics is weighted by ``1 + a / mean(a)``, where ``a`` is the attention the token receives:
a few heavily attended tokens (secondary attention sinks, often punctuation) sit in directions
where other tokens hardly vary, and an unweighted covariance would give those directions no bits.
Compression is installed by handing the model a fresh compressed cache wherever it would create
its own (plain ``model(...)`` calls and ``model.generate``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel

from spectralquant.calibration import Calibration, ModelSignature
from spectralquant.calibration_builder import CalibrationBuilder
from spectralquant.corpus import default_calibration_texts
from spectralquant.rope import LinearRope, RopeTable, apply_rope

from .base import STATE_ATTR, Adapter, WrapState, register_adapter
from .hf_attention import attention_probabilities, capture_attention
from .hf_cache_argument import cache_argument

# RoPE types whose inverse frequencies are fixed at load time (dynamic ones update them per forward).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@register_adapter
class HFCausalLMAdapter(Adapter):
    family = "Hugging Face causal LMs"
    model_types = (
        "llama", "gemma3_text", "gemma3", "gemma2", "gemma", "qwen2", "qwen3", "qwen3_moe", "mistral", "mixtral",
        "phi3", "granite", "starcoder2",
    )

    @classmethod
    def matches(cls, model) -> bool:
        config = getattr(model, "config", None)
        return isinstance(model, PreTrainedModel) and getattr(config, "model_type", None) in cls.model_types

    @property
    def text_config(self):
        return self.model.config.get_text_config(decoder=True)

    def signature(self) -> ModelSignature:
        c = self.text_config
        n = c.num_hidden_layers
        heads = c.num_key_value_heads or c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return ModelSignature(
            n, [heads] * n, [head_dim] * n, model_type=c.model_type, name=str(self.model.config.name_or_path)
        )

    def sliding_windows(self) -> list[int | None]:
        """Per layer, the attention window (``None`` for full attention), as transformers' own
        DynamicCache would lay the layers out for this config."""
        layers = DynamicCache(config=self.model.config).layers
        if len(layers) != self.text_config.num_hidden_layers:
            raise ValueError(f"transformers built {len(layers)} cache layers for this model; expected one per layer")
        return [layer.sliding_window if getattr(layer, "is_sliding", False) else None for layer in layers]

    # ------------------------------------------------------------------------------ calibration

    def calibrate(
        self,
        tokenizer=None,
        texts: Iterable[str] | None = None,
        token_ids: torch.Tensor | None = None,
        seq_len: int = 2048,
        max_tokens: int = 6144,
        skip_first: int = 4,
        samples_per_layer: int = 0,
        attention_weighted: bool = True,
        position_copies: int = 2,
        max_position: int | None = None,
        pre_rope_keys: bool = False,
        seed: int = 0,
        progress: bool = True,
    ) -> Calibration:
        """Run text through the model, capturing K/V and queries per layer and KV head.

        Text comes from ``token_ids [N, L]``, or ``texts`` tokenized with ``tokenizer`` (default:
        the bundled English corpus), cut into sequences of ``seq_len`` tokens (each starting with
        BOS when the tokenizer has one) until ``max_tokens``. The first ``skip_first`` positions
        of each sequence (attention sinks, kept in fp16 anyway) are left out of the statistics.
        ``attention_weighted`` weights each token by the attention it receives (see the module
        docstring); ``samples_per_layer`` keeps raw vectors for fitted codebooks.

        Keys are stored post-RoPE, so their distribution depends on position; a short calibration
        would miss the positions of a long context. Because RoPE is a rotation group, a key seen at
        position ``p`` is the key at ``p + delta`` rotated back by ``delta``: each key is also
        added ``position_copies`` times, rotated by offsets drawn uniformly from
        ``[0, max_position - p)`` (default: the model's ``max_position_embeddings``).

        ``pre_rope_keys`` measures keys before RoPE instead (RoPE taken off at each key's position),
        whose statistics do not depend on position, so no copies are added; caches built from the
        calibration then store keys before RoPE. The query moment that weights key errors
        (``attention_aware``) is then measured on queries as a key ``delta`` positions back sees
        them (RoPE at ``t - delta`` taken off the query at ``t``), ``max(position_copies, 1)`` times
        with ``delta`` uniform in ``[0, max_position)``.
        """
        if token_ids is None:
            token_ids = tokenize_for_calibration(tokenizer, texts, seq_len, max_tokens)
        if token_ids.dim() != 2 or token_ids.shape[1] <= skip_first:
            raise ValueError(f"token_ids must be [N, L] with L > {skip_first}, got {tuple(token_ids.shape)}")
        if pre_rope_keys and self.rope_table(0) is None:
            raise ValueError(
                f"pre_rope_keys=True needs a rotary embedding, and this {self.text_config.model_type} model has none"
            )
        builder = CalibrationBuilder(self.signature(), samples_per_layer=samples_per_layer)
        device = next(self.model.parameters()).device
        bar = tqdm(total=token_ids.numel(), desc="calibrating", unit="tok", disable=not progress)
        s = skip_first
        limit = max_position or getattr(self.text_config, "max_position_embeddings", None) or token_ids.shape[1]
        generator = torch.Generator().manual_seed(seed)

        def on_attention(module, query, key, value, mask, options) -> None:
            weights = None
            if attention_weighted:
                # A quarter of the query rows estimates the attention each key receives well enough.
                mass = attention_probabilities(
                    query, key, mask, options.get("scaling"), options.get("softcap"), stride=4
                )
                mass = mass[:, :, s:]
                weights = (1 + mass / mass.mean(-1, keepdim=True).clamp_min(1e-30)).transpose(1, 2)
            layer = module.layer_idx
            builder.add(layer, "value", value[:, :, s:].transpose(1, 2), weights)
            positions = torch.arange(s, key.shape[2])
            if pre_rope_keys:
                table = self.rope_table(layer)
                cos, sin = table(positions[None].to(key.device))
                builder.add(layer, "key", apply_rope(key[:, :, s:], cos, sin, inverse=True).transpose(1, 2), weights)
                for _ in range(max(position_copies, 1)):
                    delta = (torch.rand(positions.shape, generator=generator) * limit).long()
                    cos, sin = table((positions - delta)[None].to(key.device))
                    seen = apply_rope(query[:, :, s:], cos, sin, inverse=True)
                    builder.add_query(layer, seen.transpose(1, 2))
            else:
                builder.add(layer, "key", key[:, :, s:].transpose(1, 2), weights)
                for _ in range(position_copies if limit > key.shape[2] else 0):
                    delta = (torch.rand(positions.shape, generator=generator) * (limit - positions)).long()
                    moved = self.rotate_positions(layer, key[:, :, s:], delta.to(key.device))
                    builder.add(layer, "key", moved.transpose(1, 2), weights)
                builder.add_query(layer, query[:, :, s:].transpose(1, 2))
            o_proj = getattr(module, "o_proj", None)
            if o_proj is not None and module.layer_idx not in builder.output_moments:
                builder.set_output_projection(module.layer_idx, o_proj.weight)

        with torch.inference_mode(), capture_attention(self.model, on_attention):
            for row in token_ids:
                self.model(input_ids=row[None].to(device), use_cache=False)
                bar.update(row.numel())
        bar.close()
        info = {
            "position_copies": position_copies,
            "max_position": int(limit),
            "tokens": int(token_ids.numel()),
            "sequences": int(token_ids.shape[0]),
            "seq_len": int(token_ids.shape[1]),
            "attention_weighted": attention_weighted,
        }
        return builder.build(info, keys_pre_rope=pre_rope_keys)

    def rope_table(self, layer: int) -> RopeTable | None:
        """The model's rotary embedding for ``layer`` as a table (positions ``[B, T]`` to ``cos,
        sin [B, T, R]`` in float32), or None if the model has none: a :class:`LinearRope` for
        RoPE types whose frequencies never change (the fused kernel can apply those), else the
        model's own rotary module."""
        rotary = getattr(self.model.get_decoder(), "rotary_emb", None)
        if rotary is None:
            return None
        args, prefix, rope_type = {}, "", getattr(rotary, "rope_type", None)
        if "layer_type" in inspect.signature(rotary.forward).parameters:
            args["layer_type"] = self.text_config.layer_types[layer]
            prefix = f"{args['layer_type']}_"
            rope_type = rope_type.get(args["layer_type"]) if isinstance(rope_type, dict) else rope_type
        inv_freq = getattr(rotary, prefix + "inv_freq", None)
        if rope_type in STATIC_ROPE_TYPES and isinstance(inv_freq, torch.Tensor):
            return LinearRope(inv_freq, float(getattr(rotary, prefix + "attention_scaling", 1.0)))

        def table(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return rotary(torch.empty(0, device=positions.device), positions, **args)

        return table

    def rope_tables(self) -> list[RopeTable | None]:
        """:meth:`rope_table` of every layer."""
        return [self.rope_table(i) for i in range(self.text_config.num_hidden_layers)]

    def rotate_positions(self, layer: int, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Post-RoPE ``keys [B, H, T, D]`` moved ``delta [T]`` positions later: rotated by the
        model's own rotary embedding at those offsets (its attention scaling divided out, so this
        is a pure rotation; a partial rotary dimension rotates only the leading dims)."""
        cos, sin = self.rope_table(layer)(delta[None])
        norm = (cos**2 + sin**2).sqrt().clamp_min(1e-12)
        return apply_rope(keys, cos / norm, sin / norm).to(keys.dtype)

    # ------------------------------------------------------------------------------- install

    def install(self, state: WrapState) -> None:
        """A compressed cache replaces the one transformers would create: a forward pre-hook
        supplies it when no cache is passed, and ``generate`` gets one unless the caller passes a
        cache of their own (an explicit ``DynamicCache`` stays uncompressed). The cache goes under
        the argument name the installed transformers uses (:func:`cache_argument`); a cache passed
        under the other name is honoured as well."""
        model = self.model
        name = cache_argument(model)

        def given_cache_key(kwargs) -> str:
            return next((key for key in (name, "past_key_values") if kwargs.get(key) is not None), name)

        def inject_cache(module, args, kwargs):
            use_cache = kwargs.get("use_cache")
            if use_cache is None:
                use_cache = getattr(module.config, "use_cache", True)
            if not use_cache:
                return None
            key = given_cache_key(kwargs)
            cache = kwargs.get(key)
            if cache is None:
                cache = kwargs[key] = state.make_cache()
            if _is_compressed(cache):
                cache.set_padding(kwargs.get("attention_mask"))
                state.last_cache = cache
            return args, kwargs

        handle = model.register_forward_pre_hook(inject_cache, with_kwargs=True)
        state.undo.append(handle.remove)

        original_generate = model.generate

        @functools.wraps(original_generate)
        def generate(*args, **kwargs):
            key = given_cache_key(kwargs)
            if kwargs.get(key) is None and kwargs.get("use_cache", True):
                kwargs[key] = state.make_cache()
            return original_generate(*args, **kwargs)

        model.generate = generate
        state.undo.append(lambda: delattr(model, "generate"))
        if state.attention is not None:
            previous = model.config._attn_implementation
            model.set_attn_implementation(state.attention)
            state.undo.append(lambda: model.set_attn_implementation(previous))
        setattr(model, STATE_ATTR, state)


def _is_compressed(cache) -> bool:
    return hasattr(cache, "compression_stats")


def tokenize_for_calibration(tokenizer, texts: Iterable[str] | None, seq_len: int, max_tokens: int) -> torch.Tensor:
    """Token ids ``[N, seq_len]`` cut from ``texts`` (default: the bundled corpus; each row starts
    with BOS if the tokenizer has one), at most ``max_tokens`` in all; raises if there is no
    tokenizer or the texts give less than one row."""
    if tokenizer is None:
        raise ValueError(
            "calibrating a language model needs a tokenizer (or token_ids): sq.calibrate(model, tokenizer)"
        )
    if texts is None:
        texts = default_calibration_texts()
    if seq_len < 8:
        raise ValueError(f"seq_len must be at least 8, got {seq_len}")
    bos = getattr(tokenizer, "bos_token_id", None)
    body = seq_len - (bos is not None)
    rows = []
    budget = max(1, max_tokens // seq_len)
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - body + 1, body):
            chunk = ids[start : start + body]
            rows.append(([bos] if bos is not None else []) + chunk)
            if len(rows) >= budget:
                return torch.tensor(rows)
    if not rows:
        raise ValueError(f"the calibration texts give fewer than seq_len={seq_len} tokens; pass more text")
    return torch.tensor(rows)
