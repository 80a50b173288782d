"""Conversations: a turn reuses the whole history as stored KV and answers as a full prefill of it would."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

from kvchunks.chunk_kv import ChunkKV
from kvchunks.rope import apply_rope, unrotate
from kvchunks.tiers import RamTier
from conftest import make_tiny_model_dir
from ragblend import RagBlend, SessionNotFoundError
from ragblend.contexts import ContextChunk
from ragblend.sessions import SessionBusyError, policy
from ragblend.storage.session_store import Turn

PASSAGES = [
    "The lighthouse of Varn was built in 1821 by the engineer Oda Pell. It stands on a granite cliff.",
    "Oda Pell later moved to the city of Kessel, where she designed three bridges over the river Am.",
    "Kessel is famous for its glass markets. Its mayor in 1850 was Tomas Reh.",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm_dir):
    return make_tiny_model_dir(tmp_path_factory.mktemp("models"), "llama", smollm_dir)


@pytest.fixture
def rb(tiny_model_factory, embedder, tmp_path):
    with RagBlend(tmp_path / "store", model=tiny_model_factory("llama"), embedder=embedder) as rb:
        yield rb


def conversation_ids(rb: RagBlend, session_id: str) -> list[int]:
    record = rb.session_manager.store.get(session_id)
    template, _ = rb.session_manager.prefix(record.system)
    return list(template.prefix_ids) + [t for turn in record.turns for t in turn.token_ids]


def full_prefill_logits(rb: RagBlend, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return rb.model.model(torch.tensor([ids])).logits[0, -1].float()


def send_and_reference(rb, chat, question, contexts, **kw):
    """A turn's answer, and the first-token logits of a full prefill of the whole conversation up to it."""
    before = conversation_ids(rb, chat.session_id)
    answer = chat.send(question, contexts=contexts, max_new_tokens=4, **kw)
    turn = rb.session_manager.store.get(chat.session_id).turns[-1]
    prompt = before + turn.token_ids[: answer.prompt_tokens - len(before)]
    return answer, full_prefill_logits(rb, prompt)


def test_a_later_turn_equals_full_prefill_of_the_whole_conversation(rb):
    chat = rb.chat()
    first, reference = send_and_reference(rb, chat, "Who built the lighthouse?", PASSAGES[:2], mode="full")
    assert (first.first_token_logits - reference).abs().max() < 1e-4
    second, reference = send_and_reference(rb, chat, "Where did she move?", PASSAGES[2:], mode="full")
    # the history comes back from fp16 storage: close, not bit-equal
    assert (second.first_token_logits - reference).abs().max() < 2e-2
    assert second.timings["history_source"] == "ram"
    assert second.timings["history_tokens"] == len(rb.template.prefix_ids) + len(
        rb.session_manager.store.get(chat.session_id).turns[0].token_ids)


@pytest.mark.parametrize("kind", ["qwen3", "gemma3"])
def test_a_later_turn_equals_full_prefill_in_every_family(tiny_model_factory, embedder, tmp_path, kind):
    """The history (un-rotated and re-rotated with each layer's own RoPE table: gemma3 has two) and the
    answer fed back into the cache run the same layers as a full prefill of the conversation."""
    with RagBlend(tmp_path / "store", model=tiny_model_factory(kind), embedder=embedder) as rb:
        chat = rb.chat()
        send_and_reference(rb, chat, "Who built the lighthouse?", PASSAGES[:2], mode="full")
        second, reference = send_and_reference(rb, chat, "Where did she move?", PASSAGES[2:], mode="full")
        assert second.timings["history_source"] == "ram"
        assert (second.first_token_logits - reference).abs().max() < 2e-2


@pytest.mark.parametrize("mode", ["blend", "reuse", "prefix"])
def test_every_mode_works_in_a_conversation(rb, mode):
    chat = rb.chat()
    for question in ("Who built the lighthouse?", "Where did she move?"):
        answer = chat.send(question, contexts=PASSAGES, mode=mode, max_new_tokens=3)
        assert answer.mode == mode
    assert chat.turns == 2


def test_chunks_already_in_the_history_are_not_repeated(rb):
    chat = rb.chat()
    chat.send("Who built the lighthouse?", contexts=PASSAGES[:2], max_new_tokens=3)
    history = chat.history_tokens
    again = chat.send("And when?", contexts=PASSAGES[:2], max_new_tokens=3)
    assert again.chunks == []
    assert again.prompt_tokens == history + len(rb.template.suffix_ids("And when?"))


def test_the_history_is_the_exact_token_sequence_the_model_saw(rb):
    chat = rb.chat()
    answer = chat.send("Who built the lighthouse?", contexts=PASSAGES[:1], max_new_tokens=4)
    turn = rb.session_manager.store.get(chat.session_id).turns[0]
    expected = list(rb.template.chunk_ids(PASSAGES[0])) + rb.template.suffix_ids("Who built the lighthouse?")
    assert turn.token_ids == expected + answer.token_ids + list(rb.template.joint_ids)


def test_a_restarted_process_resumes_the_session_from_disk(tiny_model_factory, embedder, tmp_path):
    model = tiny_model_factory("llama")
    with RagBlend(tmp_path / "store", model=model, embedder=embedder) as rb:
        chat = rb.chat()
        chat.send("Who built the lighthouse?", contexts=PASSAGES[:2], mode="full", max_new_tokens=4)
        session_id = chat.session_id
    with RagBlend(tmp_path / "store", model=model, embedder=embedder) as again:
        chat = again.chat(session_id)
        answer, reference = send_and_reference(again, chat, "Where did she move?", PASSAGES[2:], mode="full")
        assert answer.timings["history_source"] == "disk"
        assert (answer.first_token_logits - reference).abs().max() < 2e-2
        assert chat.turns == 2
    again.close()


def test_a_crash_during_a_save_loses_only_that_turns_kv(model_dir, tmp_path):
    """The child dies inside the second turn's save; the first turn's KV survives, the second is recomputed."""
    store = tmp_path / "store"
    script = textwrap.dedent(f"""
        import os, sys
        from ragblend import RagBlend
        from ragblend.storage.session_store import SessionStore
        rb = RagBlend({str(store)!r}, model={str(model_dir)!r})
        chat = rb.chat("s1", create=True)
        chat.send("Who built the lighthouse?", contexts={PASSAGES[:2]!r}, mode="full", max_new_tokens=4)
        chat.wait()
        SessionStore.commit_segment = lambda *a: os._exit(3)
        chat.send("Where did she move?", contexts={PASSAGES[2:]!r}, mode="full", max_new_tokens=4)
        chat.wait()
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr
    with RagBlend(store, model=model_dir) as rb:
        chat = rb.chat("s1")
        turns = rb.session_manager.store.get("s1").turns
        assert [t.has_kv for t in turns] == [True, False]
        answer, reference = send_and_reference(rb, chat, "Is Kessel famous?", PASSAGES[:1], mode="full")
        assert answer.timings["history_source"] == "recomputed"
        assert (answer.first_token_logits - reference).abs().max() < 2e-2
        assert [t.has_kv for t in rb.session_manager.store.get("s1").turns[:2]] == [True, True]


def test_overflow_drops_the_oldest_turns_and_keeps_the_rest_without_recompute(rb):
    chat = rb.chat(max_history_tokens=len(rb.template.prefix_ids) + 60)
    for question, passage in zip(("Who built it?", "Where did she go?", "What is Kessel known for?"), PASSAGES):
        answer = chat.send(question, contexts=[passage], mode="full", max_new_tokens=4)
    turns = rb.session_manager.store.get(chat.session_id).turns
    assert len(turns) < 3 and turns[-1].question == "What is Kessel known for?"
    assert answer.timings["history_source"] == "ram"  # the kept turns were re-positioned, not recomputed
    assert chat.history_tokens <= len(rb.template.prefix_ids) + 60 + len(turns[-1].token_ids)


def test_truncation_drops_the_oldest_turns_until_the_rest_fit():
    turns = [Turn(i, [0] * tokens, [], f"q{i}") for i, tokens in enumerate([30, 20, 10])]
    assert [t.segment for t in policy.fit(turns, 30)] == [1, 2]
    assert [t.segment for t in policy.fit(turns, 60)] == [0, 1, 2]
    assert policy.fit(turns, 5) == []


def test_a_question_is_off_topic_only_when_unlike_the_recent_turns_and_sharing_no_chunk():
    recent = [Turn(0, [1], ["c1"], "q", embedding=[1.0, 0.0])]
    unlike, alike = np.array([0.0, 1.0]), np.array([1.0, 0.0])
    other, shared = [ContextChunk("c2", (1,), "x")], [ContextChunk("c1", (1,), "x")]
    assert policy.off_topic(recent, other, unlike)
    assert not policy.off_topic(recent, other, alike)
    assert not policy.off_topic(recent, shared, unlike)
    assert not policy.off_topic([], other, unlike)


def test_stored_turn_keys_are_position_free():
    """Turns are saved with RoPE undone, so a truncated history re-rotates them at new positions exactly."""
    keys = torch.randn(3, 7, 16)
    positions = torch.arange(40, 47)
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2) / 16))
    angles = torch.cat([positions[:, None] * inv] * 2, dim=-1)[None]
    cos, sin = angles.cos(), angles.sin()
    assert torch.allclose(unrotate(apply_rope(keys, cos, sin), cos, sin), keys, atol=1e-5)


def test_streamed_turn_is_saved_like_a_collected_one(rb):
    chat = rb.chat()
    stream = chat.send("Who built the lighthouse?", contexts=PASSAGES[:2], max_new_tokens=4, stream=True)
    text = "".join(stream)
    assert stream.answer.text == text.strip()
    assert chat.turns == 1


def test_a_streamed_turn_left_early_frees_its_session_and_is_not_recorded(rb):
    chat = rb.chat()
    for _ in chat.send("Who built the lighthouse?", contexts=PASSAGES[:2], max_new_tokens=32, stream=True):
        break  # the loop's iterator is collected here: the stream closes, the session's lock with it
    stream = chat.send("Who built the lighthouse?", contexts=PASSAGES[:2], max_new_tokens=32, stream=True)
    pieces = iter(stream)
    next(pieces)
    stream.close()  # while `pieces` is still held
    assert chat.turns == 0  # neither turn finished
    assert chat.send("And the bridges?", contexts=PASSAGES[1:], max_new_tokens=4).text is not None
    assert chat.turns == 1


def test_a_turn_waits_a_bounded_time_for_a_running_one(rb, monkeypatch):
    monkeypatch.setattr(rb.session_manager, "busy_wait_s", 0.2)
    chat = rb.chat()
    with chat.send("Who built the lighthouse?", contexts=PASSAGES[:2], max_new_tokens=8, stream=True) as running:
        pieces = iter(running)
        next(pieces)
        started = time.monotonic()
        with pytest.raises(SessionBusyError, match="answering another turn"):
            chat.send("And the bridges?", contexts=PASSAGES[1:], max_new_tokens=4)
        assert time.monotonic() - started < 5
    assert chat.send("And the bridges?", contexts=PASSAGES[1:], max_new_tokens=4).text is not None


def test_unknown_session_is_an_error_unless_created(rb):
    with pytest.raises(SessionNotFoundError, match="create=True"):
        rb.chat("no-such-session")
    assert rb.sessions() == []
    chat = rb.chat("named", create=True)
    assert chat.session_id == "named" and chat.turns == 0


def test_ending_a_session_drops_its_kv(rb):
    chat = rb.chat()
    chat.send("Who built the lighthouse?", contexts=PASSAGES[:2], max_new_tokens=3)
    assert rb.end_session(chat.session_id)
    assert rb.sessions() == []
    with rb.store.env.begin() as txn:
        assert rb.session_manager.store.kv.chunk_ids(txn) == []
    with pytest.raises(SessionNotFoundError):
        chat.send("Where did she move?", contexts=PASSAGES[2:], max_new_tokens=3)


def test_idle_sessions_expire_after_their_ttl(rb):
    chat = rb.chat(ttl_s=0.3)
    chat.send("Who built the lighthouse?", contexts=PASSAGES[:2], max_new_tokens=3)
    chat.wait()
    kept = rb.chat(ttl_s=60)
    time.sleep(0.5)
    assert [s.id for s in rb.sessions()] == [kept.session_id]
    with pytest.raises(SessionNotFoundError):
        rb.chat(chat.session_id)


def test_sessions_report_turns_tokens_bytes_and_tier(rb):
    chat = rb.chat()
    chat.send("Who built the lighthouse?", contexts=PASSAGES[:2], max_new_tokens=3)
    chat.wait()
    (info,) = rb.sessions()
    assert (info.id, info.turns, info.tier) == (chat.session_id, 1, "ram")
    assert info.tokens == chat.history_tokens - len(rb.template.prefix_ids)
    layers, heads, dim = rb.model.num_layers, rb.model.num_kv_heads, rb.model.head_dim
    assert info.bytes == info.tokens * layers * 2 * heads * dim * 2


def test_sessions_with_one_system_prompt_share_one_prefix(rb):
    chats = [rb.chat(system="Answer tersely.") for _ in range(5)]
    prefixes = {id(rb.session_manager.prefix(rb.session_manager.store.get(c.session_id).system)[1]) for c in chats}
    assert len(prefixes) == 1
    answer = chats[0].send("Who built the lighthouse?", contexts=PASSAGES[:1], max_new_tokens=3)
    text = rb.model.tokenizer.decode(conversation_ids(rb, chats[0].session_id))
    assert "Answer tersely." in text and "You are a helpful assistant" not in text
    assert answer.timings["history_tokens"] == len(rb.session_manager.prefix("Answer tersely.")[0].prefix_ids)


def test_concurrent_sends_on_one_session_run_one_at_a_time(rb):
    chat = rb.chat()
    answers = []

    def send(question):
        answers.append(chat.send(question, contexts=PASSAGES[:2], max_new_tokens=3))

    threads = [threading.Thread(target=send, args=(q,)) for q in ("Who built it?", "Where is it?")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert chat.turns == 2
    assert sorted(a.timings["history_tokens"] for a in answers)[1] > sorted(
        a.timings["history_tokens"] for a in answers)[0]


def test_off_topic_question_drops_the_history_when_asked(rb):
    chat = rb.chat(on_topic_switch="drop")
    chat.send("Who built the lighthouse of Varn?", contexts=PASSAGES[:1], max_new_tokens=3)
    same = chat.send("When was the Varn lighthouse built?", contexts=PASSAGES[:1], max_new_tokens=3)
    assert same.timings["topic_switch"] == 0.0
    other = chat.send("What is the boiling point of tungsten in kelvin?",
                      contexts=["Tungsten boils at 5828 kelvin, the highest of all metals."], max_new_tokens=3)
    assert other.timings["topic_switch"] == 1.0
    assert other.timings["history_tokens"] == len(rb.template.prefix_ids)
    assert chat.turns == 1


def test_closing_waits_for_pending_saves(tiny_model_factory, embedder, tmp_path):
    with RagBlend(tmp_path / "store", model=tiny_model_factory("llama"), embedder=embedder) as rb:
        chat = rb.chat()
        chat.send("Who built the lighthouse?", contexts=PASSAGES, max_new_tokens=4)
    with RagBlend(tmp_path / "store", model=tiny_model_factory("llama"), embedder=embedder) as reopened:
        assert all(t.has_kv for t in reopened.session_manager.store.get(chat.session_id).turns)


def kv(tokens: int) -> ChunkKV:
    return ChunkKV(torch.zeros(2, 1, tokens, 4, dtype=torch.float16), torch.zeros(2, 1, tokens, 4, dtype=torch.float16))


def test_ram_tier_evicts_least_recently_used_within_its_budget():
    tier = RamTier(max_bytes=3 * 32 * 2)  # three 2-token entries
    for key in "abc":
        tier.put(key, kv(2))
    assert tier.get("a") is not None  # a is now the most recent
    tier.put("d", kv(2))
    assert "b" not in tier and all(k in tier for k in "acd")
    assert tier.bytes <= tier.max_bytes and tier.evictions == 1
    tier.put("huge", kv(100))
    assert "huge" not in tier and tier.bytes <= tier.max_bytes
    assert all(k in tier for k in "acd") and tier.evictions == 1  # an entry that cannot fit evicts nothing
    assert (tier.hits, tier.misses) == (1, 0)


def test_ram_tier_keeps_what_queued_requests_need_until_released():
    tier = RamTier(max_bytes=2 * 32 * 2)  # two 2-token entries
    tier.put("queued", kv(2))
    tier.protect(["queued"])
    tier.put("b", kv(2))
    tier.put("c", kv(2))  # evicts b, never the protected entry
    assert "queued" in tier and "b" not in tier and "c" in tier
    tier.protect(["c"])
    tier.put("d", kv(2))  # no room beside protected entries: not kept
    assert "d" not in tier and tier.bytes <= tier.max_bytes
    tier.release(["queued", "c"])
    tier.put("e", kv(2))
    assert "e" in tier and "queued" not in tier


def test_cli_lists_ends_and_expires_sessions(rb, capsys):
    from ragblend.cli import main

    kept, idle = rb.chat(), rb.chat(ttl_s=0.2)
    kept.send("Who built the lighthouse?", contexts=PASSAGES[:1], max_new_tokens=3)
    kept.wait()
    main(["sessions", "list", "--store", str(rb.store.path)])
    listed = capsys.readouterr().out
    assert kept.session_id in listed and "1 turns" in listed
    time.sleep(0.4)
    main(["sessions", "gc", "--store", str(rb.store.path)])
    assert idle.session_id in capsys.readouterr().out
    main(["sessions", "end", kept.session_id, "--store", str(rb.store.path)])
    assert rb.sessions() == []
    with pytest.raises(SystemExit):
        main(["sessions", "end", "nobody", "--store", str(rb.store.path)])


def test_a_session_saved_for_another_model_is_refused(rb):
    from ragblend import StoreMismatchError

    chat = rb.chat()
    store = rb.session_manager.store
    with store.env.begin(write=True) as txn:
        record = store.read(txn, chat.session_id)
        record.fingerprint = "0" * 32
        store.write(txn, record)
    with pytest.raises(StoreMismatchError, match="another model"):
        rb.chat(chat.session_id)


def test_a_damaged_turn_record_is_recomputed_not_served(rb):
    chat = rb.chat()
    chat.send("Who built the lighthouse?", contexts=PASSAGES[:2], mode="full", max_new_tokens=4)
    chat.wait()
    store = rb.session_manager.store
    key = store.segment_key(chat.session_id, 0)
    layer_key = store.kv._layer_key(key, 1)
    with store.env.begin(write=True) as txn:
        damaged = bytearray(txn.get(layer_key, db=store.kv.kv_db))
        damaged[5] ^= 0xFF
        txn.put(layer_key, bytes(damaged), db=store.kv.kv_db)
    store.ram.clear()
    answer, reference = send_and_reference(rb, chat, "Where did she move?", PASSAGES[2:], mode="full")
    assert answer.timings["history_source"] == "recomputed"
    assert (answer.first_token_logits - reference).abs().max() < 2e-2


def test_first_turns_of_several_threads_at_once_all_answer(rb):
    """Sessions are opened lazily: concurrent first turns beside concurrent queries share one manager and
    never deadlock on the store (LMDB databases opened while another thread wrote used to)."""
    rb.add_documents(PASSAGES)
    barrier, done = threading.Barrier(4), []

    def client(i: int) -> None:
        barrier.wait()
        if i % 2:
            done.append("".join(rb.query("Which river?", top_k=2, max_new_tokens=4, stream=True)))
        else:
            done.append("".join(rb.chat().send("Which river?", top_k=2, max_new_tokens=4, stream=True)))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(done) == 4 and not any(t.is_alive() for t in threads)
