"""Specification: stored per-chunk KV is exactly what the model computes for the chunk behind the prefix.

Each chunk is prefilled alone behind the fixed prompt prefix, so a chunk of n tokens occupies
positions P .. P+n-1 (P = len(prefix_ids)) whatever its place in its document. Keys are stored
*before* RoPE, so rotating them to those positions must reproduce the model's own cache; values
carry no position and must match as they are. Storage is fp16, so stored KV matches within fp16
rounding; `compute_kv` (fp32, before storage) matches to float32 round-off.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import hf_forward

from index.docstore import ChunkRecord
from kvchunks.rope import apply_rope, rotary_cos_sin
from ragblend.api import RagBlend
from ragblend.engine.layout import PromptLayout
from ragblend.engine.model import LoadedModel
from ragblend.engine.precompute import compute_kv

# gemma3's window (16) is shorter than the prompt prefix: every chunk sits past it on its sliding layers.
KINDS = ["llama", "llama_mha", "qwen2", "qwen3", "mistral", "llama3_rope", "gemma3"]

# Long enough for three chunks of at most 24 tokens, so later chunks are checked too.
DOCUMENT = (
    "The lighthouse on Gull Point was built in 1871 from granite quarried on the island. "
    "Its lamp burned whale oil until 1902, when a kerosene burner replaced it. "
    "Keepers rowed to the mainland each Sunday for supplies and mail. "
    "The tower was automated in 1964 and the keeper's cottage became a small museum."
)
CHUNK_TOKENS = 24


def assert_matches_fp16(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to fp16 storage rounding (relative 1e-3, absolute 1e-3 of the tensor's magnitude)."""
    expected = expected.float()
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.float(), expected, rtol=1e-3, atol=1e-3 * scale)


def assert_matches_fp32(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), rtol=1e-5, atol=1e-5)


def rotate_to(keys: torch.Tensor, model: LoadedModel, start: int, layer: int) -> torch.Tensor:
    """Pre-RoPE keys [..., n, head_dim] of `layer` rotated to positions start .. start+n-1 with the model's own
    RoPE for that layer's type."""
    positions = torch.arange(start, start + keys.shape[-2])
    attention = model.model.base_model.layers[layer].self_attn
    layer_type = getattr(attention, "layer_type", None) if model.family.per_type_rope else None
    cos, sin = rotary_cos_sin(model.model.base_model.rotary_emb, positions, torch.float32, layer_type)
    return apply_rope(keys.float(), cos, sin)


@dataclass
class Ingested:
    rb: RagBlend
    model: LoadedModel
    chunks: list[ChunkRecord]

    @property
    def prefix_ids(self) -> list[int]:
        return list(self.rb.template.prefix_ids)

    @property
    def P(self) -> int:
        return len(self.prefix_ids)

    def reference_cache(self, chunk: ChunkRecord):
        """Hugging Face's cache for prefix + chunk (post-RoPE keys, [batch, kv_heads, seq, head_dim])."""
        return hf_forward(self.model, self.prefix_ids + chunk.token_ids)[1]


@pytest.fixture(scope="module", params=KINDS)
def ingested(request, tmp_path_factory, tiny_model_factory, embedder) -> Ingested:
    model = tiny_model_factory(request.param)
    rb = RagBlend(tmp_path_factory.mktemp(f"store-{request.param}"), model=model, embedder=embedder,
                  chunk_tokens=CHUNK_TOKENS)
    [doc_id] = rb.add_documents([{"id": "lighthouse", "text": DOCUMENT}])
    with rb.store.env.begin() as txn:
        chunks = [rb.store.docs.get_chunk(txn, cid) for cid in rb.store.docs.get_doc(txn, doc_id).chunk_ids]
    assert len(chunks) >= 3, "the document should span several chunks"
    return Ingested(rb, model, chunks)


def test_stored_kv_has_every_layer_in_fp16_shaped_by_the_model(ingested):
    m = ingested.model
    for chunk in ingested.chunks:
        kv = ingested.rb.store.kv.load(chunk.chunk_id)
        expected = (m.num_layers, m.num_kv_heads, len(chunk.token_ids), m.head_dim)
        assert tuple(kv.keys.shape) == expected and tuple(kv.values.shape) == expected
        assert kv.keys.dtype == kv.values.dtype == torch.float16


def test_stored_keys_rotated_to_their_positions_behind_the_prefix_match_the_model_cache(ingested):
    for chunk in ingested.chunks:
        kv = ingested.rb.store.kv.load(chunk.chunk_id)
        cache = ingested.reference_cache(chunk)
        for layer in range(ingested.model.num_layers):
            assert_matches_fp16(rotate_to(kv.keys[layer], ingested.model, ingested.P, layer),
                                cache.layers[layer].keys[0, :, ingested.P:])


def test_stored_values_match_the_model_cache(ingested):
    for chunk in ingested.chunks:
        kv = ingested.rb.store.kv.load(chunk.chunk_id)
        cache = ingested.reference_cache(chunk)
        for layer in range(ingested.model.num_layers):
            assert_matches_fp16(kv.values[layer], cache.layers[layer].values[0, :, ingested.P:])


def test_keys_are_stored_before_rope(ingested):
    chunk = ingested.chunks[0]
    stored = ingested.rb.store.kv.load(chunk.chunk_id).keys[0].float()
    post_rope = ingested.reference_cache(chunk).layers[0].keys[0, :, ingested.P:]
    # At P > 0 every position is rotated, so stored pre-RoPE keys are far from the cache's keys.
    assert ingested.P > 0
    assert (stored - post_rope).abs().max() > 100 * 1e-3 * post_rope.abs().max()


def test_compute_kv_before_storage_matches_the_model_cache_to_float32_precision(ingested):
    m = ingested.model
    prefix = ingested.rb.chunk_kv.spans.prefix_kv
    for chunk in ingested.chunks:
        [kv] = compute_kv(m.decoder, [chunk.token_ids], prefix)
        assert kv.keys.dtype == torch.float32
        cache = ingested.reference_cache(chunk)
        for layer in range(m.num_layers):
            assert_matches_fp32(rotate_to(kv.keys[layer], m, ingested.P, layer), cache.layers[layer].keys[0, :, ingested.P:])
            assert_matches_fp32(kv.values[layer], cache.layers[layer].values[0, :, ingested.P:])


def test_prefix_kv_matches_the_model_cache_of_the_prefix(ingested):
    m = ingested.model
    prefix = ingested.rb.chunk_kv.spans.prefix_kv
    assert prefix.num_tokens == ingested.P
    cache = ingested.reference_cache(ingested.chunks[0])
    for layer in range(m.num_layers):
        assert_matches_fp32(rotate_to(prefix.keys[layer], m, 0, layer), cache.layers[layer].keys[0, :, : ingested.P])
        assert_matches_fp32(prefix.values[layer], cache.layers[layer].values[0, :, : ingested.P])


def test_cache_rows_stored_by_sessions_and_paths_are_the_pre_rope_kv(ingested):
    """A conversation's turn and a path node are rows of a prefill's cache with RoPE undone by each layer's
    own table: the same KV as the chunk's precompute."""
    chunk, requests = ingested.chunks[1], ingested.rb.requests
    layout = PromptLayout.build(tuple(ingested.prefix_ids), [(chunk.chunk_id, tuple(chunk.token_ids))], [])
    cache = requests.engine.full_prefill(layout).cache
    segment = requests.segment([(layer.keys, layer.values) for layer in cache.layers], ingested.P, len(layout))
    stored = ingested.rb.store.kv.load(chunk.chunk_id)
    assert_matches_fp16(segment.keys, stored.keys)
    assert_matches_fp16(segment.values, stored.values)


def test_batched_precompute_with_padding_equals_one_chunk_at_a_time(ingested):
    m = ingested.model
    prefix = ingested.rb.chunk_kv.spans.prefix_kv
    token_lists = [c.token_ids for c in ingested.chunks]
    assert len({len(t) for t in token_lists}) > 1, "chunks of different lengths exercise the padding"
    batched = compute_kv(m.decoder, token_lists, prefix)
    for tokens, kv in zip(token_lists, batched):
        [alone] = compute_kv(m.decoder, [tokens], prefix)
        assert kv.num_tokens == len(tokens)
        assert_matches_fp32(kv.keys, alone.keys)
        assert_matches_fp32(kv.values, alone.values)


def test_precompute_ignores_forwards_running_on_other_threads(tiny_model):
    """A session save or another request may run the model while a chunk's KV is captured."""
    import threading

    ids = list(range(100, 140))
    alone = compute_kv(tiny_model.decoder, [ids], None)[0]
    stop = threading.Event()

    def other_requests():
        with torch.inference_mode():
            while not stop.is_set():
                tiny_model.model(torch.tensor([[5, 6, 7]]))

    thread = threading.Thread(target=other_requests)
    thread.start()
    try:
        during = [compute_kv(tiny_model.decoder, [ids], None)[0] for _ in range(20)]
    finally:
        stop.set()
        thread.join()
    for kv in during:
        assert torch.equal(kv.keys, alone.keys) and torch.equal(kv.values, alone.values)
