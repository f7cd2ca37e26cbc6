"""KV-cached decoding equals the full forward; greedy generation equals transformers' generate()."""

import pytest
import torch

from gptoss import load_model
from gptoss.generation.cache import PAGE_SIZE, PREFILL_CHUNK, ContextError, KVCache, allocated_kv_bytes
from gptoss.generation.generate import generate, stream
from gptoss.generation.sampling import SamplingParams, sample
from tests.conftest import random_hf_model, tiny_config

WINDOW, CHUNK, PAGE = 8, 4, 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from gptoss.weights.random_checkpoint import write_random_checkpoint

    cfg = tiny_config(num_layers=3, sliding_window=WINDOW)
    path = write_random_checkpoint(cfg, tmp_path_factory.mktemp("ck") / "tiny", seed=5)
    return load_model(path, dtype=torch.float32)


def cached_logits(model, prompts, continuations, page_size=PAGE):
    """Logits of every prompt and continuation token, computed through the cache: each prompt prefilled
    alone in chunks, then one token per step for all rows together. Pages of 4 positions, so sliding
    groups give pages back as they go. Returns, per row, [len(prompt) + len(continuation), V]."""
    longest = max(len(p) + len(c) for p, c in zip(prompts, continuations))
    cache = KVCache.for_tokens(model.config, longest, len(prompts), page_size=page_size, chunk=CHUNK, dtype=model.dtype)
    sequences = [cache.sequence() for _ in prompts]
    prefill = [torch.cat([model(torch.tensor([p[s:s + CHUNK]]), cache=cache.batch([seq], [p[s:s + CHUNK]]))[0]
                          for s in range(0, len(p), CHUNK)]) for seq, p in zip(sequences, prompts)]
    decoded = []
    for t in range(len(continuations[0])):
        step = [[c[t]] for c in continuations]
        decoded.append(model(torch.tensor(step), cache=cache.batch(sequences, step)))
    decoded = torch.cat(decoded, dim=1)
    return [torch.cat((prefill[row], decoded[row])) for row in range(len(prompts))]


def full_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0]


@torch.no_grad()
def test_cached_decode_equals_full_forward_batch_1(model):
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 512, (6,), generator=g).tolist()
    continuation = torch.randint(0, 512, (30,), generator=g).tolist()  # 36 tokens: sliding pages given back
    (got,) = cached_logits(model, [prompt], [continuation])
    diff = (got - full_logits(model, prompt + continuation)).abs().max().item()
    print(f"batch 1: max |cached - full| = {diff:.2e}")
    assert diff < 1e-5


@torch.no_grad()
def test_cached_decode_equals_full_forward_ragged_batch(model):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (3, 13, 7)]
    continuations = [torch.randint(0, 512, (20,), generator=g).tolist() for _ in prompts]
    for row, got in enumerate(cached_logits(model, prompts, continuations)):
        diff = (got - full_logits(model, prompts[row] + continuations[row])).abs().max().item()
        print(f"ragged row {row} (prompt {len(prompts[row])}): max |cached - full| = {diff:.2e}")
        assert diff < 1e-5


def test_sliding_layers_hold_only_their_window():
    """A sequence growing to 600 tokens in uneven steps of at most 8, with pages of 4: its sliding group
    never holds more than the pages of window - 1 + chunk positions plus one (for a misaligned step), its
    full group all of them; a pool of `for_tokens` pages suffices, one page fewer than the peak does not."""
    cfg = tiny_config(num_layers=4, sliding_window=16)
    steps = [8, 3, 5, 1, 7, 6] * 21
    steps = steps[:next(i for i in range(len(steps)) if sum(steps[:i]) >= 600)]

    def grow(cache):
        (full,), (sliding,) = [[g for g, group in enumerate(cache.groups) if group.sliding == kind] for kind in (False, True)]
        sequence, most, peak = cache.sequence(), 0, 0
        for count in steps:
            batch = cache.batch([sequence], [[1] * count])
            batch.begin(batch.positions)
            for layer in range(cfg.num_layers):  # what a forward pass does, without the model
                kv = torch.zeros(1, count, cfg.num_kv_heads, cfg.head_dim)
                batch.update(layer, kv, kv)
            most = max(most, sum(p >= 0 for p in sequence.tables[sliding]))
            peak = max(peak, sequence.held_pages())
            assert len(sequence.tables[full]) == -(-sequence.length // 4)
        return most, peak, sequence.length

    cache = KVCache.for_tokens(cfg, sum(steps), page_size=4, chunk=8, dtype=torch.float32)
    assert cache.num_pages == -(-sum(steps) // 4) + 7
    most, peak, length = grow(cache)
    assert length == sum(steps) >= 600 and 16 // 4 < most <= -(-(16 - 1 + 8) // 4) + 1 == 7
    with pytest.raises(ContextError, match="pages of the KV cache are in use"):
        grow(KVCache(cfg, peak - 1, page_size=4, chunk=8, dtype=torch.float32))
    # The arithmetic of gpt-oss-20b: 12 full + 12 sliding layers, 8 KV heads x 64 x (K, V) x bf16, pages of 32.
    from gptoss import preset
    per_token_layer = 2 * 8 * 64 * 2
    for context in (4096, 32768, 131072):
        sizes = allocated_kv_bytes(preset("gpt-oss-20b"), context)
        assert sizes["full_layers"] == 12 * context * per_token_layer
        assert sizes["sliding_layers"] == 12 * PAGE_SIZE * (-(-(128 - 1 + PREFILL_CHUNK) // PAGE_SIZE) + 1) * per_token_layer


def test_greedy_generation_matches_transformers(tmp_path):
    cfg = tiny_config(num_layers=3, sliding_window=8)
    hf = random_hf_model(cfg, seed=11)
    hf.save_pretrained(tmp_path / "m")
    ours = load_model(tmp_path / "m", dtype=torch.float32)
    prompt = torch.randint(0, cfg.vocab_size, (5,), generator=torch.Generator().manual_seed(2)).tolist()
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=80, min_new_tokens=80, do_sample=False,
                           eos_token_id=None, pad_token_id=cfg.pad_token_id)[0, len(prompt):].tolist()
    got = generate(ours, prompt, max_new_tokens=80, stop_tokens=(), chunk=4)
    assert len(got) == 80 and got == expected


def test_batch_generation_equals_each_prompt_alone(model):
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42]]
    together = generate(model, prompts, max_new_tokens=25, stop_tokens=())
    assert together == [generate(model, p, max_new_tokens=25, stop_tokens=()) for p in prompts]


def test_stop_tokens_and_seeded_sampling(model):
    free = generate(model, [1, 2, 3], max_new_tokens=30, stop_tokens=())
    stop = free[10]
    stopped = generate(model, [1, 2, 3], max_new_tokens=30, stop_tokens=[stop])
    assert stopped == free[: free.index(stop) + 1]
    kw = dict(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.9, stop_tokens=())
    assert generate(model, [1, 2, 3], seed=3, **kw) == generate(model, [1, 2, 3], seed=3, **kw)
    assert list(stream(model, [1, 2, 3], 20, SamplingParams(1.0, seed=4))) == \
        generate(model, [1, 2, 3], max_new_tokens=20, temperature=1.0, seed=4, stop_tokens=[])


def test_sampling_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = lambda **kw: {sample(logits, SamplingParams(1.0, **kw), g).item() for _ in range(200)}  # noqa: E731
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.7) == {0, 1}        # 0.5 < 0.7 needs the second token, not the third
    assert draws(top_p=2.2e-313) == {0}      # a top_p that is 0 in float32 still keeps the top token
    assert {sample(logits, SamplingParams(1e-101), g).item() for _ in range(20)} == {0}  # tends to greedy
    assert draws(min_p=0.35) == {0, 1}       # 0.15 < 0.35 x 0.5
    assert draws() == {0, 1, 2, 3}
    assert sample(logits, SamplingParams(0.0)).item() == 0


def test_context_overflow_is_a_clear_error(model):
    with pytest.raises(ContextError, match="exceeds the model's context"):
        generate(model, [1] * 4000, max_new_tokens=200)


def test_text_stream_joins_to_the_decoded_tokens(tmp_path):
    """stream_text's pieces join to the tokenizer's decode of the same tokens, multi-byte characters
    whole; gptoss.generate is the same function at the package's top level."""
    import gptoss
    from gptoss import preset
    from gptoss.weights.random_checkpoint import write_random_checkpoint

    model = load_model(write_random_checkpoint(preset("tiny"), tmp_path / "tiny", seed=3), dtype=torch.float32)
    prompt = gptoss.get_tokenizer().encode("Ünïcödé 🙂 text")
    pairs = list(gptoss.stream_text(model, prompt, 40, SamplingParams(1.0, seed=0)))
    tokens = [t for t, _ in pairs if t is not None]
    assert tokens == gptoss.generate(model, prompt, 40, temperature=1.0, seed=0, stop_tokens=())
    text_tokens = [t for t in tokens if t < 199998]
    assert "".join(text for _, text in pairs) == gptoss.get_tokenizer().decode(text_tokens, errors="replace")
