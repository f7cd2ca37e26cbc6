"""The response store keeps what `store: true` and `previous_response_id` need: responses and their
conversations round trip, survive a restart, stay within their byte budget (the newest kept), refuse an
unusable file with one clear message, and take puts from many threads at once."""

from __future__ import annotations

import os
import sqlite3
import threading

import pytest

from gptoss.server.store import ResponseStore, StoreError, default_store_path


def response(rid: str, text: str = "hi", previous: str | None = None) -> dict:
    return {"id": rid, "object": "response", "previous_response_id": previous,
            "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}]}


def conversation(rid: str, text: str = "hi") -> list[dict]:
    return [{"type": "message", "role": "user", "content": "hello"}] + response(rid, text)["output"]


def test_round_trip(tmp_path):
    store = ResponseStore(tmp_path / "r.sqlite3")
    first = response("resp_1", "héllo ✓")  # non-ASCII text comes back as it went in
    store.put(first, conversation("resp_1", "héllo ✓"))
    assert store.get("resp_1") == first
    assert store.conversation("resp_1") == conversation("resp_1", "héllo ✓")
    assert store.get("resp_2") is None and store.conversation("resp_2") is None
    assert store.total_bytes() > 0
    assert store.delete("resp_1") is True
    assert store.delete("resp_1") is False
    assert store.get("resp_1") is None and store.conversation("resp_1") is None
    assert store.total_bytes() == 0
    store.close()


def test_survives_restart(tmp_path):
    path = tmp_path / "deeper" / "r.sqlite3"  # the folder is made on open
    store = ResponseStore(path)
    store.put(response("resp_1"), conversation("resp_1"))
    store.put(response("resp_2", "again", previous="resp_1"), conversation("resp_2", "again"))
    size = store.total_bytes()
    store.close()

    store = ResponseStore(path)
    assert store.get("resp_2") == response("resp_2", "again", previous="resp_1")
    assert store.conversation("resp_1") == conversation("resp_1")
    assert store.total_bytes() == size
    store.close()


def test_put_replaces_an_id(tmp_path):
    store = ResponseStore(tmp_path / "r.sqlite3")
    store.put(response("resp_1", "old"), conversation("resp_1", "old"))
    store.put(response("resp_1", "a longer new text"), conversation("resp_1", "a longer new text"))
    assert store.get("resp_1")["output"][0]["content"][0]["text"] == "a longer new text"
    assert store.conversation("resp_1") == conversation("resp_1", "a longer new text")
    alone = ResponseStore(tmp_path / "other.sqlite3")
    alone.put(response("resp_1", "a longer new text"), conversation("resp_1", "a longer new text"))
    assert store.total_bytes() == alone.total_bytes()  # the old row's bytes are not counted any more
    store.close(), alone.close()


def test_eviction_keeps_the_newest(tmp_path):
    probe = ResponseStore(tmp_path / "probe.sqlite3")
    probe.put(response("resp_0"), conversation("resp_0"))
    one = probe.total_bytes()  # every resp_<digit> below has this size
    probe.close()

    store = ResponseStore(tmp_path / "r.sqlite3", max_bytes=3 * one)
    for i in range(5):
        store.put(response(f"resp_{i}"), conversation(f"resp_{i}"))
    assert [store.get(f"resp_{i}") is not None for i in range(5)] == [False, False, True, True, True]
    assert store.total_bytes() == 3 * one

    # One response bigger than the whole budget: everything else goes, it stays.
    store.put(response("resp_big", "x" * 4 * one), conversation("resp_big", "x" * 4 * one))
    assert store.get("resp_big") is not None
    assert all(store.get(f"resp_{i}") is None for i in range(5))
    assert store.total_bytes() > store.max_bytes
    store.close()


def test_corrupt_file(tmp_path):
    path = tmp_path / "r.sqlite3"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(StoreError, match="not a usable response store") as info:
        ResponseStore(path)
    assert str(path) in str(info.value)


def test_folder_that_cannot_be_made(tmp_path):
    (tmp_path / "a_file").write_text("")
    path = tmp_path / "a_file" / "r.sqlite3"
    with pytest.raises(StoreError) as info:
        ResponseStore(path)
    assert str(path) in str(info.value)


def test_concurrent_puts(tmp_path):
    path = tmp_path / "r.sqlite3"
    store = ResponseStore(path)
    start, errors = threading.Barrier(8), []

    def work(t: int):
        try:
            start.wait()
            for i in range(20):
                rid = f"resp_{t}_{i}"
                store.put(response(rid), conversation(rid))
                assert store.get(rid) == response(rid)
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert all(store.get(f"resp_{t}_{i}") is not None for t in range(8) for i in range(20))
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 160


def test_default_path(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTOSS_HOME", str(tmp_path))
    assert default_store_path() == tmp_path / "responses.sqlite3"
