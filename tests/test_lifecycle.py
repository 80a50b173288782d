"""What a RagBlend holds, it gives back: `close()` releases its store (LMDB keeps the file mapped, 1 TiB of
address space by default, until the environment closes), a RagBlend dropped without `close()` is
collected with its sessions' background work and its store, and a closed one says so when used."""
from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest

from ragblend import RagBlend, StoreClosedError

DOC = "The lighthouse on Varn Island was painted red in 1931. " * 8


def mapped(store: Path) -> bool:
    """Whether this process maps any file of the store folder."""
    return str(store.resolve()) in Path("/proc/self/maps").read_text()


def used(rb: RagBlend) -> None:
    """Everything that opens something: documents, an answer, a conversation turn (its save included)."""
    rb.add_documents([DOC])
    rb.query("What colour was the lighthouse?", max_new_tokens=4)
    chat = rb.chat()
    chat.send("When was it painted?", max_new_tokens=4)
    rb.session_manager.wait()


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the process's mappings from /proc")
def test_close_unmaps_the_store_and_a_second_close_does_nothing(tmp_path, tiny_model, embedder):
    rb = RagBlend(tmp_path / "store", model=tiny_model, embedder=embedder)
    used(rb)
    assert mapped(tmp_path / "store")
    rb.close()
    assert not mapped(tmp_path / "store")
    rb.close()


def test_a_closed_ragblend_says_so_when_asked_again(tmp_path, tiny_model, embedder):
    with RagBlend(tmp_path / "store", model=tiny_model, embedder=embedder) as rb:
        used(rb)
    with pytest.raises(StoreClosedError, match="closed"):
        rb.query("What colour was the lighthouse?", max_new_tokens=4)
    reopened = RagBlend(tmp_path / "store", model=tiny_model, embedder=embedder)  # the folder is intact
    assert reopened.query("What colour was the lighthouse?", max_new_tokens=4).token_ids
    reopened.close()


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the process's mappings from /proc")
def test_a_dropped_ragblend_is_collected_with_its_sessions_and_its_store(tmp_path, tiny_model, embedder):
    rb = RagBlend(tmp_path / "store", model=tiny_model, embedder=embedder)
    used(rb)
    sweeper = rb.session_manager._sweeper
    alive = weakref.ref(rb)
    del rb
    gc.collect()
    assert alive() is None
    sweeper.join(timeout=10)
    assert not sweeper.is_alive() and not mapped(tmp_path / "store")


def test_two_ragblends_on_one_folder_keep_it_open_until_both_close(tmp_path, tiny_model, embedder):
    first = RagBlend(tmp_path / "store", model=tiny_model, embedder=embedder)
    used(first)
    second = RagBlend(tmp_path / "store", model=tiny_model, embedder=embedder)
    first.close()
    assert second.query("What colour was the lighthouse?", max_new_tokens=4).token_ids
    second.close()


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the process's mappings from /proc")
def test_a_ragblend_dropped_while_its_answer_streams_lives_until_the_stream_is_read(tmp_path, tiny_model, embedder):
    rb = RagBlend(tmp_path / "store", model=tiny_model, embedder=embedder)
    rb.add_documents([DOC])
    expected = rb.query("What colour was the lighthouse?", max_new_tokens=12).token_ids
    stream = rb.query("What colour was the lighthouse?", max_new_tokens=12, stream=True)
    alive = weakref.ref(rb)
    del rb
    gc.collect()
    "".join(stream)
    assert stream.answer.token_ids == expected
    del stream
    gc.collect()
    assert alive() is None and not mapped(tmp_path / "store")
