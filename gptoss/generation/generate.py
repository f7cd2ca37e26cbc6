"""Prefill in chunks, then decode token by token through the KV cache, for one prompt or a ragged batch."""

from __future__ import annotations

import numbers
from typing import Iterator, Sequence

import torch

from gptoss.chat.grammar import Constraint, OutputRules
from gptoss.chat.tokenizer import TextDecoder
from gptoss.generation.cache import PREFILL_CHUNK, ContextError, KVCache, pages_per_sequence
from gptoss.generation.sampling import SamplingParams, adjust, sample
from gptoss.generation.stopping import StopRule
from gptoss.model.transformer import Transformer


def _is_single(prompt_ids) -> bool:
    """One prompt (ints, or a 1-D tensor / array) rather than a batch of them."""
    return getattr(prompt_ids, "ndim", None) == 1 or (len(prompt_ids) > 0 and isinstance(prompt_ids[0], numbers.Integral))


def _as_batch(prompt_ids) -> list[list[int]]:
    prompts = [prompt_ids] if _is_single(prompt_ids) else prompt_ids
    return [[int(t) for t in p] for p in prompts]


@torch.inference_mode()
def stream_batch(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 params: SamplingParams = SamplingParams(), stop_tokens: Sequence[int] = (),
                 chunk: int = PREFILL_CHUNK, cache: KVCache | None = None,
                 rules: OutputRules | None = None) -> Iterator[list[int | None]]:
    """Yields, per step, one new token per prompt (None for prompts that already stopped).

    Each prompt is prefilled alone, in chunks, then all are decoded together; rows never see each other's
    keys, so each computes exactly what it would alone. `cache`: a KVCache kept between calls, so that a
    prompt that begins like an earlier one (or like an earlier prompt and its completion: a conversation's
    next turn) computes only the rest; without one, a cache just large enough is made for the call.
    `rules`: the harmony completion must follow them (`gptoss.chat.grammar`: a JSON answer, tool calls
    with valid arguments); a row whose grammar is complete stops.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ContextError("every prompt needs at least one token")
    rule = StopRule(max_new_tokens, stop_tokens)
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.config.max_context:
        raise ContextError(f"prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds "
                           f"the model's context of {model.config.max_context}")
    device = model.device
    if cache is None:
        cache = KVCache.for_tokens(model.config, longest + max_new_tokens, len(prompts), chunk=chunk,
                                   dtype=model.dtype, device=device)
    elif len(prompts) * pages_per_sequence(model.config, longest + max_new_tokens, cache.page_size,
                                           cache.chunk) > cache.num_pages:
        raise ContextError(f"{len(prompts)} prompt(s) of up to {longest} tokens plus {max_new_tokens} new tokens do not "
                           f"fit the KV cache ({cache.num_pages} pages of {cache.page_size} tokens)")
    chunk = min(chunk, cache.chunk)
    sequences = [cache.sequence() for _ in prompts]
    try:
        last = []
        for sequence, prompt in zip(sequences, prompts):
            prompt = list(prompt)
            for start in range(sequence.reuse_prefix(prompt), len(prompt), chunk):
                piece = prompt[start:start + chunk]
                logits = model(torch.tensor([piece], device=device), cache=cache.batch([sequence], [piece]),
                               last_only=True)
            last.append(logits[:, -1])
        logits = torch.cat(last)
        generator = params.generator(device)
        stopped = [False] * len(prompts)
        generated: list[list[int]] = [[] for _ in prompts]
        constraints = [Constraint(rules, model.config.vocab_size) if rules is not None and rules.constrained else None
                       for _ in prompts]
        for count in range(1, max_new_tokens + 1):
            if params.adjusts_logits:  # logit bias and penalties: per row, after its own tokens
                logits = torch.cat([adjust(logits[r:r + 1], params, generated[r]) for r in range(len(prompts))])
            for row, constraint in enumerate(constraints):
                if constraint is not None and not stopped[row]:
                    constraint.mask(logits[row:row + 1])
            tokens = sample(logits, params, generator).tolist()
            for row, token in enumerate(tokens):
                generated[row].append(token)
                if constraints[row] is not None and not stopped[row]:
                    constraints[row].advance(token)
            yield [None if done else t for t, done in zip(tokens, stopped)]
            stopped = [done or rule.finish_reason(t, count) is not None or (c is not None and c.finished)
                       for t, done, c in zip(tokens, stopped, constraints)]
            if all(stopped):
                return
            step = [[t] for t in tokens]
            logits = model(torch.tensor(step, device=device), cache=cache.batch(sequences, step), last_only=True)[:, -1]
    finally:
        for sequence in sequences:  # their pages stay in the cache for later prompts
            sequence.release()


def stream(model: Transformer, prompt_ids: Sequence[int], max_new_tokens: int,
           params: SamplingParams = SamplingParams(), stop_tokens: Sequence[int] = (), chunk: int = PREFILL_CHUNK,
           cache: KVCache | None = None, rules: OutputRules | None = None) -> Iterator[int]:
    """Yields the new tokens of one prompt as they come, the stop token included."""
    for (token,) in stream_batch(model, [prompt_ids], max_new_tokens, params, stop_tokens, chunk, cache, rules):
        yield token


def stream_text(model: Transformer, prompt_ids: Sequence[int], max_new_tokens: int,
                params: SamplingParams = SamplingParams(), stop_tokens: Sequence[int] = (),
                chunk: int = PREFILL_CHUNK, cache: KVCache | None = None) -> Iterator[tuple[int | None, str]]:
    """Yields (token, text) as tokens come: the text each token completes, decoded incrementally so a
    character split across tokens appears whole, with the token that finishes it. Special tokens carry
    no text. A character left incomplete when generation stops comes last, as (None, U+FFFD)."""
    decoder = TextDecoder()
    for token in stream(model, prompt_ids, max_new_tokens, params, stop_tokens, chunk, cache):
        yield token, decoder.feed(token)
    if tail := decoder.flush():
        yield None, tail


def generate(model: Transformer, prompt_ids, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
             seed: int | None = None, stop_tokens: Sequence[int] | None = None, chunk: int = PREFILL_CHUNK,
             cache: KVCache | None = None, rules: OutputRules | None = None):
    """New token ids for one prompt (a list of ints) or for each of a batch of prompts (a list of lists).

    Stops at max_new_tokens or after a stop token (which is included); stop tokens default to the
    model's (its generation_config.json's, else config.json's). `cache`: a KVCache kept between calls;
    `rules`: what a harmony completion must look like (see `stream_batch`).
    """
    params = SamplingParams(temperature, top_k, top_p, min_p, seed)
    stop = model.generation_config.eos_token_ids if stop_tokens is None else stop_tokens
    prompts = _as_batch(prompt_ids)
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in stream_batch(model, prompts, max_new_tokens, params, stop, chunk, cache, rules):
        for out, token in zip(outputs, step):
            if token is not None:
                out.append(token)
    return outputs[0] if _is_single(prompt_ids) else outputs
