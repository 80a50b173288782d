"""Specification of the embedder and the vector index (fast: no LLM, one small embedder load)."""
from pathlib import Path

import numpy as np
import pytest

from index import Embedder, VectorIndex, default_embedder_path
from index.embedder import folder_fingerprint

KINDS = ["flat", "hnsw"]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


def unit(*rows: list[float]) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def filled(kind: str) -> VectorIndex:
    """Three orthogonal unit vectors under ids 10, 20, 30."""
    index = VectorIndex(4, kind)
    index.add(np.array([10, 20, 30]), np.eye(4, dtype=np.float32)[:3])
    return index


# --- Embedder -----------------------------------------------------------------------------------


def test_default_embedder_is_bundled_minilm(embedder):
    assert default_embedder_path().is_dir()
    assert (embedder.name, embedder.dim) == ("all-MiniLM-L6-v2", 384)


def test_embeddings_are_unit_length_float32(embedder):
    vectors = embedder.embed(["A short sentence.", "Another, slightly longer sentence about rivers."])
    assert vectors.shape == (2, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_embedding_no_texts_gives_empty_matrix(embedder):
    assert embedder.embed([]).shape == (0, 384)


def test_embeddings_rank_by_meaning(embedder):
    query, cat, tax = embedder.embed(
        [
            "What do cats like to eat?",
            "My cat loves fish and sleeps on the windowsill.",
            "The tax code sets the deduction for capital gains.",
        ]
    )
    assert query @ cat > query @ tax


def test_fingerprint_is_stable_and_tracks_weight_size(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
    before = folder_fingerprint(tmp_path)
    assert folder_fingerprint(tmp_path) == before
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 32)
    assert folder_fingerprint(tmp_path) != before


def test_default_fingerprint_matches_embedder(embedder):
    assert embedder.fingerprint == folder_fingerprint(default_embedder_path())


def test_missing_embedder_folder_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        Embedder(missing)


def test_folder_without_model_files_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a sentence-transformers"):
        Embedder(tmp_path)


# --- VectorIndex --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_search_returns_best_first_with_ids_and_scores(kind):
    index = filled(kind)
    hits = index.search(unit([0.2, 0.9, 0.1, 0.0])[0], k=2)
    assert [i for i, _ in hits] == [20, 10]
    np.testing.assert_allclose([s for _, s in hits], unit([0.2, 0.9, 0.1, 0.0])[0, [1, 0]], atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_k_larger_than_index_returns_every_vector_without_padding(kind):
    hits = filled(kind).search(unit([1, 1, 1, 0])[0], k=50)
    assert sorted(i for i, _ in hits) == [10, 20, 30]


def test_empty_index_search_returns_nothing():
    assert VectorIndex(4).search(unit([1, 0, 0, 0])[0], k=3) == []


@pytest.mark.parametrize("kind", KINDS)
def test_re_adding_an_id_replaces_its_vector(kind):
    index = filled(kind)
    index.add(np.array([10]), unit([0, 0, 0, 1]))
    assert len(index) == 3
    assert index.search(unit([0, 0, 0, 1])[0], k=1) == [(10, pytest.approx(1.0))]


@pytest.mark.parametrize("kind", KINDS)
def test_remove_drops_ids_and_ignores_unknown_ones(kind):
    index = filled(kind)
    index.remove(np.array([20, 999]))
    assert sorted(index.ids().tolist()) == [10, 30]
    assert 20 not in [i for i, _ in index.search(unit([0, 1, 0, 0])[0], k=3)]


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(kind, tmp_path: Path):
    index = filled(kind)
    index.save(tmp_path / "vectors.faiss")
    loaded = VectorIndex.load(tmp_path / "vectors.faiss")
    assert (loaded.kind, loaded.dim, sorted(loaded.ids().tolist())) == (kind, 4, [10, 20, 30])
    query = unit([0.1, 0.2, 0.9, 0.0])[0]
    assert loaded.search(query, k=3) == index.search(query, k=3)
    assert [p.name for p in tmp_path.iterdir()] == ["vectors.faiss"]  # no temp file left behind


@pytest.mark.parametrize("kind", KINDS)
def test_loaded_index_can_still_remove(kind, tmp_path: Path):
    filled(kind).save(tmp_path / "vectors.faiss")
    loaded = VectorIndex.load(tmp_path / "vectors.faiss")
    loaded.remove(np.array([10]))
    assert sorted(loaded.ids().tolist()) == [20, 30]


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(ValueError, match="flat, hnsw"):
        VectorIndex(4, "ivf")


def test_vectors_of_wrong_dim_are_rejected():
    with pytest.raises(ValueError, match=r"\[n, 4\]"):
        VectorIndex(4).add(np.array([1]), np.ones((1, 5), dtype=np.float32))


def test_ids_and_vectors_must_match_in_count():
    with pytest.raises(ValueError, match="2 ids for 1 vectors"):
        VectorIndex(4).add(np.array([1, 2]), unit([1, 0, 0, 0]))


def test_query_of_wrong_dim_is_rejected():
    with pytest.raises(ValueError, match=r"\[4\]"):
        filled("flat").search(np.ones(3, dtype=np.float32), k=1)


def test_non_positive_k_is_rejected():
    with pytest.raises(ValueError, match="k must be positive"):
        filled("flat").search(unit([1, 0, 0, 0])[0], k=0)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_a_filter_keeps_top_k_among_the_allowed_ids_only(kind):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((200, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = VectorIndex(8, kind)
    index.add(np.arange(200), vectors)
    allowed = np.arange(0, 200, 10)
    assert {i for i, _ in index.search(vectors[5], 4, index.filter(only=allowed))} <= set(allowed.tolist())
    assert len(index.search(vectors[5], 4, index.filter(only=allowed))) == 4
    skipped = {i for i, _ in index.search(vectors[5], 4, index.filter(excluded=np.arange(100)))}
    assert len(skipped) == 4 and min(skipped) >= 100
    assert index.search(vectors[5], 4, index.filter(only=np.array([], dtype=np.int64))) == []
    assert index.filter().params is None
