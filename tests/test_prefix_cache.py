"""Prefix reuse in the paged KV cache is exact: with reuse, logits and greedy tokens equal those computed
without it (and equal `generate`), for every way a new prompt can meet what the cache holds.

A tiny fp32 model with a sliding window of 8 on every other layer, pages of 4 positions: a prefix ends
on a page boundary, and the sliding layers need the pages of the window before it, which they gave
back when the first sequence moved on (kept in the pool until evicted).
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from gptoss import load_model
from gptoss.generation.cache import KVCache, page_bytes
from gptoss.generation.generate import generate
from gptoss.server.engine import Engine, Generation
from tests.conftest import tiny_config

PAGE, CHUNK, WINDOW = 4, 8, 8


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from gptoss.weights.random_checkpoint import write_random_checkpoint

    path = write_random_checkpoint(tiny_config(num_layers=3, sliding_window=WINDOW),
                                   tmp_path_factory.mktemp("ck") / "tiny", seed=7)
    return load_model(path, dtype=torch.float32)


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def last_logits(model, cache: KVCache, prompt: list[int]) -> tuple[int, torch.Tensor]:
    """(tokens reused, logits of the last position) computing `prompt` through `cache`; the sequence is
    released afterwards, so its pages stay cached."""
    sequence = cache.sequence()
    reused = sequence.reuse_prefix(prompt)
    for start in range(reused, len(prompt), CHUNK):
        piece = prompt[start:start + CHUNK]
        logits = model(torch.tensor([piece]), cache=cache.batch([sequence], [piece]))
    sequence.release()
    return reused, logits[0, -1]


@torch.inference_mode()
def full(model, prompt: list[int]) -> torch.Tensor:
    return model(torch.tensor([prompt]))[0, -1]


def test_every_kind_of_reuse_gives_the_full_computation(model):
    cache = KVCache.for_tokens(model.config, 64, 4, page_size=PAGE, chunk=CHUNK, dtype=torch.float32)
    a = tokens(40, 0)
    cases = [
        ("first time", a, 0),
        ("repeated", a, 36),                                      # all whole pages but the one holding the last token
        ("grown by a turn", a + tokens(11, 1), 40),
        ("diverging inside the last window", a[:37] + tokens(9, 2), 36),
        ("diverging at a page boundary", a[:32] + tokens(10, 3), 32),
        ("shorter, ending inside a page", a[:22], 20),
    ]
    for name, prompt, expected_reuse in cases:
        reused, logits = last_logits(model, cache, prompt)
        diff = (logits - full(model, prompt)).abs().max().item()
        print(f"{name}: reused {reused} of {len(prompt)}, max |logit diff| {diff:.2e}")
        assert reused == expected_reuse and diff < 1e-5, name


def test_reuse_after_eviction_stays_exact(model):
    """A pool too small to keep everything: once other prompts have evicted pages, the longest prefix
    whose pages (full layers', and sliding layers' for the window before it) all survive is reused."""
    a = tokens(40, 10)
    reuses = []
    for others in range(5):  # after 0, 1, ... unrelated prompts that take the pool over, oldest pages first
        cache = KVCache.for_tokens(model.config, 48, 2, page_size=PAGE, chunk=CHUNK, dtype=torch.float32)
        last_logits(model, cache, a)
        for seed in range(others):
            last_logits(model, cache, tokens(30, 11 + seed))
        prompt = a + tokens(5, 20)
        reused, logits = last_logits(model, cache, prompt)
        reuses.append(reused)
        assert (logits - full(model, prompt)).abs().max() < 1e-5
    print("reused after 0.. unrelated prompts:", reuses)
    assert reuses[0] == 40 and reuses[-1] == 0 and any(0 < r < 40 for r in reuses)


def test_a_lost_sliding_page_shortens_the_reuse(model):
    """The full layers' pages of a prefix are all there but a sliding page of the window before its end
    is gone: the reuse stops where the sliding pages of its window are complete."""
    cache = KVCache.for_tokens(model.config, 64, 2, page_size=PAGE, chunk=CHUNK, dtype=torch.float32)
    a = tokens(40, 20)
    last_logits(model, cache, a)
    sliding = next(g for g, group in enumerate(cache.groups) if group.sliding)
    prompt = a[:24] + tokens(6, 21)
    hashes = cache.cached_prefix(prompt)
    assert len(hashes) == 6
    lost = cache.registry.pop((sliding, hashes[4]))        # as if evicted: block 4 (positions 16..19)
    cache.key_of_page.pop(lost)
    assert len(cache.cached_prefix(prompt)) == 4             # a prefix of 16 needs blocks 2..3 only
    reused, logits = last_logits(model, cache, prompt)
    assert reused == 16 and (logits - full(model, prompt)).abs().max() < 1e-5


def test_generate_keeps_a_cache_between_calls(model):
    """The Python API: a conversation growing turn by turn through one KVCache gives what it gives
    without one, while each turn computes only what is new."""
    cache = KVCache.for_tokens(model.config, 256, page_size=PAGE, chunk=CHUNK, dtype=torch.float32)
    conversation = tokens(30, 30)
    for turn in range(4):
        cached = len(cache.cached_prefix(conversation)) * PAGE
        reply = generate(model, conversation, 6, cache=cache, chunk=CHUNK)
        assert reply == generate(model, conversation, 6, chunk=CHUNK)
        if turn:  # the previous prompt and the reply's computed tokens (all but its last), in whole pages
            assert cached == (previous - 1) // PAGE * PAGE
        conversation = conversation + reply + tokens(9, 31 + turn)
        previous = len(conversation) - 9
    assert cache.free_pages == cache.num_pages


# --- the server's engine ---------------------------------------------------------------------------------

def run(engine: Engine, prompts: list[list[int]], max_new: int = 6, together: bool = True):
    """The tokens `engine` generates for each prompt (greedy), submitted all at once or one after another;
    also each generation's cached prompt tokens, and the highest queue length seen."""
    async def collect(generation: Generation) -> list[int]:
        return [t async for t in generation.tokens()]

    async def go():
        engine.start()
        try:
            gens = []
            if together:
                gens = [engine.submit(Generation(p, max_new)) for p in prompts]
                outs = list(await asyncio.gather(*map(collect, gens)))
            else:
                outs = []
                for p in prompts:
                    gens.append(engine.submit(Generation(p, max_new)))
                    outs.append(await collect(gens[-1]))
            return outs, [g.cached_tokens for g in gens]
        finally:
            engine.close()

    return asyncio.run(go())


def engine(model, reuse: bool, **kw) -> Engine:
    return Engine(model, max_batch=kw.pop("max_batch", 3), context=kw.pop("context", 128), page_size=PAGE,
                  chunk=CHUNK, prefix_reuse=reuse, **kw)


def test_engine_reuse_on_and_off_agree_with_generate(model):
    system = tokens(42, 40)
    shared = [system + tokens(n, 41 + n) for n in (3, 11, 6, 17, 1, 9)]   # ragged, one system prompt
    conversation = [tokens(25, 50)]
    for turn in range(3):
        conversation.append(conversation[-1] + tokens(4 + turn, 51 + turn))
    repeated = [tokens(33, 60)] * 3
    expected = {name: [generate(model, p, 6, stop_tokens=(), chunk=CHUNK) for p in prompts]
                for name, prompts in (("shared", shared), ("conversation", conversation), ("repeated", repeated))}
    for reuse in (False, True):
        got, cached = run(engine(model, reuse), shared)
        assert got == expected["shared"]
        assert (max(cached) >= 40) == reuse
        got, cached = run(engine(model, reuse), conversation, together=False)
        assert got == expected["conversation"]
        # each turn reuses the whole pages of the turn before (its prompt; the reply is not in the next prompt)
        assert cached == ([0] + [len(p) // PAGE * PAGE for p in conversation[:-1]] if reuse else [0] * 4)
        got, cached = run(engine(model, reuse), repeated, together=False)
        assert got == expected["repeated"] and cached == ([0, 32, 32] if reuse else [0, 0, 0])


def test_a_full_pool_makes_requests_wait_or_pause_and_all_complete(model):
    """KV memory for about two requests, six at once: some wait for pages, running ones are preempted
    when decoding needs a page nobody frees, and every request still gets exactly its own tokens."""
    prompts = [tokens(20 + 5 * i, 70 + i) for i in range(6)]
    expected = [generate(model, p, 12, stop_tokens=(), chunk=CHUNK) for p in prompts]
    # 25 pages a request at most (15 of the full layer, 5 for each sliding one); room for two
    small = engine(model, True, max_batch=6, context=64, kv_memory=50 * page_bytes(model.config, PAGE, dtype_bytes=4))
    seen_waiting = []
    admit = small._admit

    def watching_admit():
        admit()
        seen_waiting.append(len(small._waiting))

    small._admit = watching_admit
    got, _ = run(small, prompts, max_new=12)
    assert got == expected
    assert max(seen_waiting) > 0 and small.counters["preemptions"] > 0
    assert small.cache.free_pages == small.cache.num_pages
