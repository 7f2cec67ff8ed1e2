"""A batched KV cache in fixed slots, and one decode step of a LLaMA for every live sequence.

The in-flight batching engine (core.llm_engine) keeps each running sequence's keys and values in
a slot of a preallocated pool, ``[slots, kv_heads, slot_tokens, head_dim]`` per layer: the
static-cache layout of TensorRT-LLM's non-paged KV cache and transformers' ``StaticCache``.
Live sequences are kept in slots ``0..B-1`` (a leaving sequence's slot is refilled by the last
one), so a decode step attends over the view ``pool[:B, :, :longest]`` without gathering:
nothing is copied per step but the new token's K/V.

Why a decode step of our own rather than the model's ``forward`` with a padded cache: HF's
forward over a batch of sequences of different lengths needs a left-padded cache rebuilt (or
shifted) whenever a sequence joins or leaves, and its mask code differs between releases. The
step below calls the model's own modules (projections, RMSNorm, rotary embedding, MLP, head),
so every weight and every checkpoint format stays the model's; only the attention over the
slots is written here (scaled dot-product attention with a per-row length mask, GQA by
repeating KV heads as HF's ``repeat_kv`` does). Prefill keeps the sequence's own transformers
Cache (one sequence, copied into the slot when done), so option scoring stays exactly the
one-sequence path; a prefill chunk due in the same turn as a decode step runs fused with it
(``mixed_step``), sharing the GEMMs' weight reads.

Measured reason it pays (FACTS.md, 7B-width layers, bf16, 2 vCPUs): a decode step costs 82 ms
for 1 sequence and 166 ms for 8, so 8 sequences in one step give ~4x the tokens/s: decode reads
every weight once per step whatever the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


@dataclass(frozen=True)
class SlotGeometry:
    """The pool's shape: ``slots`` sequences of at most ``slot_tokens`` positions each."""

    layers: int
    kv_heads: int
    head_dim: int
    slots: int
    slot_tokens: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        """K and V of one position in every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes(self) -> int:
        return self.bytes_per_token * self.slots * self.slot_tokens


def geometry(model, slots: int, kv_cache_bytes: int) -> SlotGeometry:
    """The pool for ``slots`` sequences within ``kv_cache_bytes`` (0: each slot holds the context).

    Every slot gets the same length (a static cache): a request whose prompt and token limit do
    not fit a slot is refused up front instead of running out of memory half-way."""
    config = model.config
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    context = int(config.max_position_embeddings)
    base = SlotGeometry(int(config.num_hidden_layers), kv_heads, head_dim, slots, context, model.dtype)
    if kv_cache_bytes <= 0:
        return base
    per_slot = kv_cache_bytes // (slots * base.bytes_per_token)
    if per_slot < 16:
        raise ValueError(f"llm_kv_cache_mb: {kv_cache_bytes >> 20} MiB holds {per_slot} tokens per sequence for "
                         f"{slots} sequences ({base.bytes_per_token} bytes a token); raise it or lower max_sequences")
    return SlotGeometry(base.layers, kv_heads, head_dim, slots, min(context, int(per_slot)), model.dtype)


class SlotCache:
    """Keys and values of up to ``geometry.slots`` sequences, live ones packed into ``0..B-1``."""

    def __init__(self, geometry: SlotGeometry, device: torch.device | str) -> None:
        self.geometry = geometry
        shape = (geometry.slots, geometry.kv_heads, geometry.slot_tokens, geometry.head_dim)
        self.keys = [torch.zeros(shape, dtype=geometry.dtype, device=device) for _ in range(geometry.layers)]
        self.values = [torch.zeros(shape, dtype=geometry.dtype, device=device) for _ in range(geometry.layers)]

    def load(self, slot: int, cache) -> int:
        """Copy one sequence's prefill cache (a transformers Cache of batch 1) into ``slot``; its length."""
        length = 0
        for layer, (k, v) in enumerate(_layers(cache)):
            length = k.shape[-2]
            self.keys[layer][slot, :, :length] = k[0]
            self.values[layer][slot, :, :length] = v[0]
        return length

    def move(self, source: int, target: int, length: int) -> None:
        """Copy a sequence from ``source`` to ``target`` (repacking after another one left)."""
        for pool in (*self.keys, *self.values):
            pool[target, :, :length] = pool[source, :, :length]


def _layers(cache):
    """(keys, values) per layer of a transformers Cache, across the 4.x and 5.x layouts."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def _repeat_kv(keys: torch.Tensor, values: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention: each KV head serves ``heads // kv_heads`` query heads (HF's ``repeat_kv``)."""
    groups = heads // keys.shape[1]
    if groups > 1:
        return keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    return keys, values


class _DecodeRows:
    """The attention of one new position per live sequence (slots ``0..B-1``), shared by
    ``decode_step`` and ``mixed_step``: each layer writes the rows' new K/V at ``lengths`` and
    attends over ``pool[:B, :, :longest]`` with a per-row length mask."""

    def __init__(self, cache: SlotCache, lengths: torch.Tensor, longest: int | None = None) -> None:
        self.cache, self.lengths = cache, lengths
        self.batch = int(lengths.shape[0])
        self.rows = torch.arange(self.batch, device=lengths.device)
        self.longest = int(lengths.max()) + 1 if longest is None else longest
        # position j of row b is visible iff j <= lengths[b] (its past and the new position)
        self.mask = (torch.arange(self.longest, device=lengths.device)[None, :] <= lengths[:, None])[:, None, None, :]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """``q``/``k``/``v`` ``[B, heads or kv_heads, 1, d]`` (rotary applied); ``[B, heads, 1, d]``."""
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys[self.rows, :, self.lengths] = k[:, :, 0]
        values[self.rows, :, self.lengths] = v[:, :, 0]
        k_all, v_all = _repeat_kv(keys[:self.batch, :, :self.longest], values[:self.batch, :, :self.longest],
                                  q.shape[1])
        return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=self.mask, scale=scale)


@torch.inference_mode()
def decode_step(model, cache: SlotCache, inputs_embeds: torch.Tensor, lengths: torch.Tensor,
                longest: int | None = None) -> torch.Tensor:
    """Logits ``[B, vocab]`` (float32) of one new position for the sequences in slots ``0..B-1``.

    ``inputs_embeds`` ``[B, 1, H]`` is each sequence's next input (its last token's embedding, or
    the last prompt position right after prefill); ``lengths`` ``[B]`` (long, on the model's
    device) its positions so far, where the new K/V are written. The caller advances lengths.
    ``longest`` (default ``max(lengths) + 1``, read from the device) fixes the attended length, so a
    caller that knows it avoids that host sync (a CUDA graph cannot hold one).
    """
    batch = inputs_embeds.shape[0]
    body = model.model
    slots = _DecodeRows(cache, lengths, longest)
    hidden = inputs_embeds
    cos, sin = body.rotary_emb(hidden, lengths[:, None])
    for index, layer in enumerate(body.layers):
        residual = hidden
        x = layer.input_layernorm(hidden)
        attn = layer.self_attn
        q = attn.q_proj(x).view(batch, 1, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(batch, 1, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(batch, 1, -1, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        out = slots.attend(index, q, k, v, attn.scaling)
        hidden = residual + attn.o_proj(out.transpose(1, 2).reshape(batch, 1, -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    hidden = body.norm(hidden)
    return model.lm_head(hidden[:, -1]).float()


@torch.inference_mode()
def mixed_step(model, cache: SlotCache, inputs_embeds: torch.Tensor, lengths: torch.Tensor, chunk: torch.Tensor,
               chunk_cache, chunk_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of the sequences in slots ``0..B-1`` fused with the next chunk of a joining
    sequence's prefill: logits ``[B, vocab]`` and the chunk's last position's ``[1, vocab]`` (float32).

    Why fused: a decode step reads every weight for a handful of rows, so running it apart from the
    chunk costs the joiner a whole weight read per chunk (measured: 1.58x its TTFT at chunks of 256,
    docs/benchmarks.md). Here the ``B`` decode rows and the ``C`` chunk rows go through the same
    projections, norms and MLP as one ``[B + C, H]`` matrix (as vLLM batches prefill and decode
    tokens); only attention is per group: the decode rows over their slots as in ``decode_step``,
    the chunk rows causally over the joiner's own cache (a transformers Cache of batch 1, extended
    in place: prefill stays the model's cache, so option scoring continues from it unchanged).
    ``chunk`` ``[1, C, H]`` holds prompt positions ``chunk_start..chunk_start + C - 1``.
    """
    batch, width = inputs_embeds.shape[0], chunk.shape[1]
    body = model.model
    device = lengths.device
    slots = _DecodeRows(cache, lengths)
    chunk_positions = torch.arange(chunk_start, chunk_start + width, device=device)
    seen = chunk_start + width
    chunk_mask = torch.arange(seen, device=device)[None, :] <= chunk_positions[:, None]  # causal, offset
    hidden = torch.cat([inputs_embeds[:, 0], chunk[0]])[None]  # [1, B + C, H]
    cos, sin = body.rotary_emb(hidden, torch.cat([lengths, chunk_positions])[None])
    for index, layer in enumerate(body.layers):
        residual = hidden
        x = layer.input_layernorm(hidden)
        attn = layer.self_attn
        q = attn.q_proj(x).view(1, batch + width, -1, attn.head_dim).transpose(1, 2)  # [1, heads, B + C, d]
        k = attn.k_proj(x).view(1, batch + width, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(1, batch + width, -1, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        # the decode rows as [B, heads, 1, d], over their slots
        out_d = slots.attend(index, *(t[0, :, :batch].transpose(0, 1)[:, :, None] for t in (q, k, v)), attn.scaling)
        # the chunk rows: [1, heads, C, d] over the joiner's cache so far and themselves
        k_c, v_c = chunk_cache.update(k[:, :, batch:].contiguous(), v[:, :, batch:].contiguous(), index)
        k_c, v_c = _repeat_kv(k_c, v_c, q.shape[1])
        out_c = F.scaled_dot_product_attention(q[:, :, batch:], k_c, v_c, attn_mask=chunk_mask, scale=attn.scaling)
        out = torch.cat([out_d[:, :, 0], out_c[0].transpose(0, 1)])  # [B + C, heads, d]
        hidden = residual + attn.o_proj(out.reshape(1, batch + width, -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    hidden = body.norm(hidden[0, [*range(batch), batch + width - 1]])  # the rows whose logits are read
    logits = model.lm_head(hidden).float()
    return logits[:batch], logits[batch:]
