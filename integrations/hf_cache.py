"""A ``transformers`` Cache whose layers hold compressed K/V: packed uint8 records plus an fp16
window of recent tokens and fp16 sink tokens.

Update contract (one layer): ``update(k, v)`` with new states ``[B, H, n, D]`` appends them to
the fp16 window and returns the layer's full key/value states for this forward (``[B, H,
held + n, D]``: compressed history dequantized into a transient tensor, then the window), or, in
fused mode, a :class:`CompressedKV` snapshot that the registered attention function reads
directly. It then ages tokens beyond the window into records. Between calls nothing but records,
scales, the window and sinks is held. Sliding-window layers keep only their window
(``sliding_window - 1`` tokens), as transformers' own ``DynamicSlidingWindowLayer`` does, with
the same mask sizes.

A codec calibrated on keys before RoPE (``LayerCodec.keys_pre_rope``) needs the layer's rotary
table: keys aging out of the window have RoPE taken off at their positions before encoding, and
reads put it back on (see :class:`CompressedKV`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from spectralquant.codec import LayerCodec
from spectralquant.compressed_kv import CompressedKV
from spectralquant.config import CompressionConfig
from spectralquant.kernels import encode
from spectralquant.rope import RopeTable, apply_rope, cache_positions

from .encoded_store import EncodedStore


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class CompressedLayer(CacheLayerMixin):
    """One layer's compressed cache. ``codec=None`` keeps every token in fp16 (an uncompressed
    layer, still counted the same way). ``rope``: the layer's rotary table, needed by codecs of
    keys before RoPE."""

    is_compileable = False
    is_croppable = True

    def __init__(
        self,
        codec: LayerCodec | None,
        config: CompressionConfig,
        sliding_window: int | None = None,
        fused: bool = False,
        rope: RopeTable | None = None,
    ):
        super().__init__()
        if codec is not None and codec.keys_pre_rope and rope is None:
            raise ValueError(
                "this codec stores keys before RoPE but the cache layer has no rotary table: "
                "the model has no rotary embedding, so calibrate it with pre_rope_keys=False"
            )
        self.codec = codec
        self.rope = rope if codec is not None and codec.keys_pre_rope else None
        self.config = config
        self.fused = fused
        self.window = config.window
        self.chunk = config.chunk
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        # Sinks matter for full attention; a sliding layer forgets them anyway.
        self.num_sinks = 0 if self.is_sliding or codec is None else config.sinks
        self.cumulative_length = 0
        self.k_store = self.v_store = None
        self.sink_keys = self.sink_values = None
        self.sink_pos: torch.Tensor | None = None  # [B] first real (non-padding) position per row
        self.pad_lengths: torch.Tensor | None = None  # set by the cache before the first update
        self.sinks_end = 0  # no row has a sink at or past this position (a Python int: no GPU sync)

    # ------------------------------------------------------------------------------------- state

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.store_dtype = torch.bfloat16 if key_states.dtype == torch.bfloat16 else torch.float16
        b, h, _, d = key_states.shape
        self.keys = key_states.new_empty(b, h, 0, d, dtype=self.store_dtype)
        self.values = value_states.new_empty(b, h, 0, value_states.shape[-1], dtype=self.store_dtype)
        if self.codec is not None:
            if (self.codec.key.heads, self.codec.key.dim) != (h, d):
                raise ValueError(
                    f"calibration has {self.codec.key.heads} KV heads of dim {self.codec.key.dim} but this layer "
                    f"receives {h} heads of dim {d}: calibrate this model first"
                )
            self.codec = self.codec.to(self.device)
            for kind in ("key", "value"):
                q = getattr(self.codec, kind)
                store = EncodedStore(b, h, q.record_bytes, q.scale_dtype, q.has_qjl, self.device, q.block)
                setattr(self, f"{kind[0]}_store", store)
        pad = self.pad_lengths
        self.sink_pos = pad.to(self.device) if pad is not None else torch.zeros(b, dtype=torch.long, device=self.device)
        if self.num_sinks:
            self.sinks_end = int(self.sink_pos.max()) + self.num_sinks
            self.sink_keys = self.keys.new_zeros(b, h, self.num_sinks, d)
            self.sink_values = self.values.new_zeros(b, h, self.num_sinks, value_states.shape[-1])
        self.is_initialized = True

    @property
    def compressed_length(self) -> int:
        return self.k_store.length if self.k_store is not None else 0

    @property
    def held(self) -> int:
        """Tokens this layer holds (compressed plus window)."""
        return 0 if not self.is_initialized else self.compressed_length + self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if not self.is_sliding:
            return self.cumulative_length + query_length, 0
        kv_offset = max(self.cumulative_length - self.sliding_window + 1, 0)
        if self.cumulative_length >= self.sliding_window:
            return self.sliding_window - 1 + query_length, kv_offset
        return self.cumulative_length + query_length, kv_offset

    # ------------------------------------------------------------------------------------ update

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._capture_sinks(key_states, value_states, self.cumulative_length)
        self.keys = torch.cat([self.keys, key_states.to(self.store_dtype)], dim=-2)
        self.values = torch.cat([self.values, value_states.to(self.store_dtype)], dim=-2)
        self.cumulative_length += key_states.shape[-2]
        if self.codec is None:
            out = self.keys.to(key_states.dtype), self.values.to(value_states.dtype)
            self._age_out()
            return out
        # The snapshot keeps this forward's window alive while aging replaces it.
        view = self.snapshot()
        self._age_out()
        if self.fused:
            return view, view
        return view.materialize(key_states.dtype)

    @property
    def history_first(self) -> int:
        """Cache slot of the first kept key record (blocked-but-dropped ones included)."""
        return self.cumulative_length - self.keys.shape[-2] - self.k_store.physical

    def snapshot(self) -> CompressedKV:
        """The layer's current contents as attention reads them."""
        return CompressedKV(
            self.k_store.view(),
            self.v_store.view(),
            self.codec.key,
            self.codec.value,
            self.keys,
            self.values,
            self.sink_keys,
            self.sink_values,
            self.sink_pos,
            self.k_store.skip,
            self.v_store.skip,
            self.rope,
            self.history_first,
        )

    def _sink_positions(self) -> torch.Tensor:
        return self.sink_pos[:, None] + torch.arange(self.num_sinks, device=self.device)

    def _capture_sinks(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        if start >= self.sinks_end:  # decoding past the sinks: skip the synchronizing nonzero()
            return
        local = self._sink_positions() - start  # [B, S] index into the new tokens
        rows, slots = ((local >= 0) & (local < k.shape[-2])).nonzero(as_tuple=True)
        if rows.numel():
            idx = local[rows, slots]
            self.sink_keys[rows, :, slots] = k[rows, :, idx].to(self.store_dtype)
            self.sink_values[rows, :, slots] = v[rows, :, idx].to(self.store_dtype)

    def _age_out(self) -> None:
        """Trim sliding layers to their window, then compress window tokens beyond ``window`` (once
        ``chunk`` have piled up). Trimming first means tokens about to be dropped are never encoded."""
        if self.is_sliding:
            excess = self.held - (self.sliding_window - 1)
            if excess > 0:
                from_store = min(excess, self.compressed_length)
                if from_store:
                    self.k_store.drop_front(from_store)
                    self.v_store.drop_front(from_store)
                if excess > from_store:
                    self.keys = self.keys[:, :, excess - from_store :].clone()
                    self.values = self.values[:, :, excess - from_store :].clone()
        n_win = self.keys.shape[-2]
        if self.codec is not None and n_win >= self.window + self.chunk:
            block = max(self.codec.key.block, self.codec.value.block)
            move = (n_win - self.window) // block * block
            keys = self.keys[:, :, :move]
            if self.rope is not None:
                cos, sin = self.rope(cache_positions(self.cumulative_length - n_win, move, self.sink_pos))
                keys = apply_rope(keys, cos, sin, inverse=True)
            self.k_store.append(encode(self.codec.key, keys.transpose(1, 2)))
            self.v_store.append(encode(self.codec.value, self.values[:, :, :move].transpose(1, 2)))
            # (Triton encode on CUDA.) Copies, so the aged-out fp16 rows are really freed.
            self.keys = self.keys[:, :, move:].clone()
            self.values = self.values[:, :, move:].clone()

    # ------------------------------------------------------------------------- batch and length ops

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (negative), or keep the first
        ``tokens_to_remove`` (positive, transformers' older convention)."""
        if not self.is_initialized:
            return
        remove = self.cumulative_length - tokens_to_remove if tokens_to_remove > 0 else -tokens_to_remove
        if remove <= 0:
            return
        if remove > self.held:
            raise ValueError(
                f"cannot crop {remove} tokens: this layer holds only the last {self.held} "
                "(a sliding-window layer has dropped older ones)"
            )
        n_win = self.keys.shape[-2]
        if remove <= n_win:
            self.keys, self.values = self.keys[:, :, : n_win - remove], self.values[:, :, : n_win - remove]
        else:  # only a compressed layer holds more than its window

            self.keys, self.values = self.keys[:, :, :0], self.values[:, :, :0]
            self.k_store.truncate(self.k_store.length - (remove - n_win))
            self.v_store.truncate(self.v_store.length - (remove - n_win))
        self.cumulative_length -= remove

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.sink_pos = fn(self.sink_pos)
        if self.num_sinks:
            self.sink_keys, self.sink_values = fn(self.sink_keys), fn(self.sink_values)
        for store in (self.k_store, self.v_store):
            if store is not None:
                store.map_batch(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def reset(self) -> None:
        self.__init__(self.codec, self.config, self.sliding_window, self.fused, self.rope)

    def offload(self):
        raise NotImplementedError("a SpectralQuant cache cannot be offloaded; it is already compressed")

    def prefetch(self):
        raise NotImplementedError("a SpectralQuant cache cannot be offloaded; it is already compressed")

    # ------------------------------------------------------------------------------- accounting

    def byte_counts(self) -> dict[str, int]:
        """Bytes of every tensor this layer holds, by role, and the fp16 bytes of the same K/V."""
        if not self.is_initialized:
            return dict(records=0, scales=0, window=0, sinks=0, index=0, fp16=0)
        k = self.k_store.nbytes() if self.k_store is not None else [0, 0, 0]
        v = self.v_store.nbytes() if self.v_store is not None else [0, 0, 0]
        b, h, _, d = self.keys.shape
        return dict(
            records=k[0] + v[0],
            scales=k[1] + k[2] + v[1] + v[2],
            window=_nbytes(self.keys) + _nbytes(self.values),
            sinks=_nbytes(self.sink_keys) + _nbytes(self.sink_values),
            index=_nbytes(self.sink_pos),
            fp16=2 * b * h * self.held * d * 2,
        )


@dataclass
class CompressionStats:
    """Bytes held by a compressed cache, by role, against the fp16 bytes of the same K/V.

    ``ratio = fp16_bytes / held_bytes``; ``calibration_bytes`` (bases, codebooks on the device) is
    a fixed per-model cost, reported separately and not in ``held_bytes``.
    """

    tokens: int
    records: int
    scales: int
    window: int
    sinks: int
    index: int
    fp16_bytes: int
    calibration_bytes: int
    per_layer: list[dict[str, int]] = field(default_factory=list)

    @property
    def held_bytes(self) -> int:
        return self.records + self.scales + self.window + self.sinks + self.index

    @property
    def ratio(self) -> float:
        return self.fp16_bytes / self.held_bytes if self.held_bytes else float("nan")

    def summary(self) -> str:
        mib = 1 << 20
        return (
            f"{self.tokens} tokens: {self.held_bytes / mib:.2f} MiB held (records {self.records / mib:.2f}, "
            f"scales {self.scales / mib:.2f}, fp16 window {self.window / mib:.2f}, sinks {self.sinks / mib:.3f}) "
            f"vs {self.fp16_bytes / mib:.2f} MiB fp16 -> {self.ratio:.2f}x; "
            f"calibration tables {self.calibration_bytes / mib:.2f} MiB"
        )


class SpectralQuantCache(Cache):
    """A ``transformers`` Cache of :class:`CompressedLayer` s, one per decoder layer.

    ``codecs[i]`` compresses layer ``i`` (``None``: fp16); ``sliding_windows[i]`` is that layer's
    attention window or ``None`` for full attention; ``ropes[i]`` its rotary table (``None``
    entries, or no list, for a model without RoPE), used by codecs of keys before RoPE.
    """

    def __init__(
        self,
        codecs: list[LayerCodec | None],
        config: CompressionConfig,
        sliding_windows: list[int | None],
        fused: bool = False,
        ropes: list[RopeTable | None] | None = None,
    ):
        ropes = ropes if ropes is not None else [None] * len(codecs)
        if not len(codecs) == len(sliding_windows) == len(ropes):
            raise ValueError("one codec, one sliding-window entry and one rotary table per layer")
        layers = [CompressedLayer(c, config, w, fused, r) for c, w, r in zip(codecs, sliding_windows, ropes)]
        super().__init__(layers=layers)
        self.config = config
        self.calibration_bytes = sum(c.nbytes() for c in codecs if c is not None)

    def set_padding(self, attention_mask: torch.Tensor) -> None:
        """Tell an empty cache where each row's real tokens start (left padding), from a 2D mask
        ``[B, L]``; sink tokens are then the first real tokens of each row."""
        if self.get_seq_length() > 0 or attention_mask is None or attention_mask.dim() != 2:
            return
        real = attention_mask.bool()
        pad = torch.where(real.any(-1), real.float().argmax(-1), torch.zeros_like(real[:, 0], dtype=torch.long))
        for layer in self.layers:
            layer.pad_lengths = pad.long()

    def compression_stats(self) -> CompressionStats:
        rows = [layer.byte_counts() for layer in self.layers]
        total = {k: sum(r[k] for r in rows) for k in rows[0]}
        return CompressionStats(
            tokens=self.get_seq_length(),
            records=total["records"],
            scales=total["scales"],
            window=total["window"],
            sinks=total["sinks"],
            index=total["index"],
            fp16_bytes=total["fp16"],
            calibration_bytes=self.calibration_bytes,
            per_layer=rows,
        )

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of K/V state the cache holds (what memory figures count)."""
        out = []
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            out += [layer.keys, layer.values, layer.sink_pos]
            out += [t for t in (layer.sink_keys, layer.sink_values) if t is not None]
            for store in (layer.k_store, layer.v_store):
                if store is not None:
                    out += [b for b in store.buffers if b is not None]
        return out
