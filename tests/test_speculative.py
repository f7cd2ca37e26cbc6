"""Speculative decoding by prompt lookup: the same greedy tokens as plain decoding, the same sampling
distribution, and a KV cache cut back exactly to the tokens kept.

A random model never repeats its context, so prompt lookup would draft nothing on it. The greedy test
drafts with an oracle instead: the plain run's own continuation, with every third draft token wrong, so
passes keep whole drafts, parts of drafts and nothing, and the cache is truncated inside pages that the
pass completed and registered (pages of 4 positions)."""

from __future__ import annotations

import torch

from gptoss.generation.cache import KVCache
from gptoss.generation.generate import generate, stream
from gptoss.generation.sampling import SamplingParams, distribution
from gptoss.generation.speculative import NgramDrafter, Speculation, accept


def test_the_drafter_proposes_what_followed_the_latest_earlier_occurrence():
    drafter = NgramDrafter([5, 2, 3, 4, 9, 2, 3, 7, 8, 6, 2, 3])
    assert drafter.draft(3) == [7, 8, 6]       # "2 3" came twice before: the later occurrence wins
    drafter.extend([1])
    assert drafter.draft(3) == []              # "2 3 1" and "3 1" never came before
    drafter = NgramDrafter([1, 2, 3, 4, 2, 3, 5, 1, 2, 3])
    assert drafter.draft(2) == [4, 2]          # the 3-gram "1 2 3" before the 2-gram "2 3" (followed by 5)
    assert NgramDrafter([5, 6, 7]).draft(4) == [] and drafter.draft(0) == []


class OracleDrafter(NgramDrafter):
    """Drafts the true continuation with every third token replaced by a wrong one."""

    truth: list[int] = []

    def draft(self, limit: int) -> list[int]:
        done = len(self.tokens) - self.prompt_length
        draft = self.truth[done:done + min(limit, 5)]
        return [t if (done + i) % 3 != 2 else (t + 1) % 1000 for i, t in enumerate(draft)]


def test_greedy_speculation_gives_plain_greedy_tokens_and_cuts_the_cache_back(tiny_random_model):
    model = tiny_random_model
    prompt = list(range(2000, 2037))
    plain = generate(model, prompt, 40, stop_tokens=())

    def drafter(tokens):
        d = OracleDrafter(tokens)
        d.prompt_length, d.truth = len(tokens), plain
        return d

    cache = KVCache.for_tokens(model.config, 128, page_size=4, dtype=model.dtype)
    speculation = Speculation(5, drafter)
    fast = list(stream(model, prompt, 40, SamplingParams(), (), cache=cache, speculation=speculation))
    assert fast == plain
    assert 0 < speculation.accepted < speculation.drafted and speculation.tokens_per_pass > 1.5
    # What stayed registered is what the kept tokens computed: the prompt and its continuation, reused
    # whole by a plain run, give the same next tokens.
    again = generate(model, prompt + plain[:20], 10, stop_tokens=(), cache=cache)
    assert again == generate(model, prompt + plain[:20], 10, stop_tokens=())


def test_speculative_sampling_draws_from_the_model_s_distribution():
    """accept's first token, for a draft of one token, over many draws: distributed as plain sampling
    from the same logits, whichever token is drafted (a likely one, an unlikely one)."""
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1], [0.1, 0.2, 0.3, 0.4]]))
    params = SamplingParams(1.0)
    expected = distribution(logits[:1], params)[0]
    g = torch.Generator().manual_seed(0)
    for drafted in (0, 3):
        counts = torch.zeros(4)
        for _ in range(20000):
            counts[accept(logits, [drafted], params, g)[0]] += 1
        assert (counts / counts.sum() - expected).abs().max() < 0.015, (drafted, counts / counts.sum())


def test_speculation_stays_out_of_the_way_with_no_repetition(tiny_random_model):
    """On text that does not repeat, nothing is drafted and every pass is a plain decode step."""
    prompt = list(range(3000, 3020))
    speculation = Speculation(4)
    tokens = list(stream(tiny_random_model, prompt, 12, SamplingParams(), (), speculation=speculation))
    assert tokens == generate(tiny_random_model, prompt, 12, stop_tokens=())
    assert speculation.drafted == 0 and speculation.passes == 11
