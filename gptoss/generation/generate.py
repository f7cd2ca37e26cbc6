"""Prefill in chunks, then decode token by token through the KV cache, for one prompt or a ragged batch."""

from __future__ import annotations

import numbers
from typing import Iterator, Sequence

import torch

from gptoss.chat.grammar import Constraint, OutputRules
from gptoss.chat.tokenizer import TextDecoder
from gptoss.generation.cache import PREFILL_CHUNK, ContextError, KVCache, pages_per_sequence
from gptoss.generation.sampling import SamplingParams, adjust, sample
from gptoss.generation.speculative import Speculation, accept
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
                                   dtype=model.dtype, device=device, kv_heads=model.kv_heads)
    elif len(prompts) * pages_per_sequence(model.config, longest + max_new_tokens, cache.page_size,
                                           cache.chunk) > cache.num_pages:
        raise ContextError(f"{len(prompts)} prompt(s) of up to {longest} tokens plus {max_new_tokens} new tokens do not "
                           f"fit the KV cache ({cache.num_pages} pages of {cache.page_size} tokens)")
    chunk = min(chunk, cache.chunk)
    sequences = [cache.sequence() for _ in prompts]
    try:
        logits = torch.cat([_prefill(model, cache, sequence, list(prompt), chunk)
                            for sequence, prompt in zip(sequences, prompts)])
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


def _prefill(model: Transformer, cache: KVCache, sequence, prompt: list[int], chunk: int) -> torch.Tensor:
    """Computes what `sequence` does not hold of `prompt` (its cached prefix is reused), a chunk a pass;
    returns the logits [1, V] after the prompt's last token."""
    for start in range(sequence.reuse_prefix(prompt), len(prompt), chunk):
        piece = prompt[start:start + chunk]
        logits = model(torch.tensor([piece], device=model.device), cache=cache.batch([sequence], [piece]),
                       last_only=True)
    return logits[:, -1]


def stream(model: Transformer, prompt_ids: Sequence[int], max_new_tokens: int,
           params: SamplingParams = SamplingParams(), stop_tokens: Sequence[int] = (), chunk: int = PREFILL_CHUNK,
           cache: KVCache | None = None, rules: OutputRules | None = None,
           speculation: Speculation | None = None) -> Iterator[int]:
    """Yields the new tokens of one prompt as they come, the stop token included. `speculation`: draft
    up to its `max_draft` tokens a step by prompt lookup and verify them in one pass (`gptoss.generation.
    speculative`; the same greedy tokens, the same sampling distribution; not with `rules` or logit
    adjustments, which then decode plainly); it records what the drafts did."""
    if speculation is not None and rules is None and not params.adjusts_logits:
        yield from _stream_speculative(model, [int(t) for t in prompt_ids], max_new_tokens, params, stop_tokens,
                                       chunk, cache, speculation)
        return
    for (token,) in stream_batch(model, [prompt_ids], max_new_tokens, params, stop_tokens, chunk, cache, rules):
        yield token


@torch.inference_mode()
def _stream_speculative(model: Transformer, prompt: list[int], max_new_tokens: int, params: SamplingParams,
                        stop_tokens: Sequence[int], chunk: int, cache: KVCache | None,
                        speculation: Speculation) -> Iterator[int]:
    """`stream` with prompt-lookup drafts: each pass feeds the newest token and a draft, keeps what
    `accept` keeps, and truncates the cache back to the kept tokens."""
    if not prompt:
        raise ContextError("every prompt needs at least one token")
    if len(prompt) + max_new_tokens > model.config.max_context:
        raise ContextError(f"prompt of {len(prompt)} tokens plus {max_new_tokens} new tokens exceeds "
                           f"the model's context of {model.config.max_context}")
    rule = StopRule(max_new_tokens, stop_tokens)
    # A pass may write a whole draft past the budget's last token before the cache is cut back.
    room = len(prompt) + max_new_tokens + speculation.max_draft
    if cache is None:
        cache = KVCache.for_tokens(model.config, room, chunk=chunk, dtype=model.dtype, device=model.device,
                                   kv_heads=model.kv_heads)
    elif pages_per_sequence(model.config, room, cache.page_size, cache.chunk) > cache.num_pages:
        raise ContextError(f"a prompt of {len(prompt)} tokens plus {max_new_tokens} new tokens and a draft of "
                           f"{speculation.max_draft} do not fit the KV cache ({cache.num_pages} pages of "
                           f"{cache.page_size} tokens)")
    sequence = cache.sequence()
    try:
        generator = params.generator(model.device)
        new = [int(sample(_prefill(model, cache, sequence, prompt, min(chunk, cache.chunk)), params, generator))]
        drafter, count = speculation.drafter(prompt), 0
        while True:
            for token in new:
                count += 1
                yield token
                if rule.finish_reason(token, count) is not None:
                    return
            drafter.extend(new)
            draft = drafter.draft(min(speculation.length, max_new_tokens - count - 1,
                                      model.config.max_context - len(drafter.tokens) - 1))
            fed = [new[-1], *draft]
            logits = model(torch.tensor([fed], device=model.device), cache=cache.batch([sequence], [fed]))[0]
            new = accept(logits, draft, params, generator)
            speculation.record(len(draft), len(new) - 1)
            if len(new) - 1 < len(draft):  # the rejected draft tokens' keys and values go
                sequence.truncate(sequence.length - (len(draft) - (len(new) - 1)))
    finally:
        sequence.release()


def stream_text(model: Transformer, prompt_ids: Sequence[int], max_new_tokens: int,
                params: SamplingParams = SamplingParams(), stop_tokens: Sequence[int] = (),
                chunk: int = PREFILL_CHUNK, cache: KVCache | None = None,
                speculation: Speculation | None = None) -> Iterator[tuple[int | None, str]]:
    """Yields (token, text) as tokens come: the text each token completes, decoded incrementally so a
    character split across tokens appears whole, with the token that finishes it. Special tokens carry
    no text. A character left incomplete when generation stops comes last, as (None, U+FFFD)."""
    decoder = TextDecoder()
    for token in stream(model, prompt_ids, max_new_tokens, params, stop_tokens, chunk, cache, speculation=speculation):
        yield token, decoder.feed(token)
    if tail := decoder.flush():
        yield None, tail


def generate(model: Transformer, prompt_ids, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
             seed: int | None = None, stop_tokens: Sequence[int] | None = None, chunk: int = PREFILL_CHUNK,
             cache: KVCache | None = None, rules: OutputRules | None = None, speculate: int = 0):
    """New token ids for one prompt (a list of ints) or for each of a batch of prompts (a list of lists).

    Stops at max_new_tokens or after a stop token (which is included); stop tokens default to the
    model's (its generation_config.json's, else config.json's). `cache`: a KVCache kept between calls;
    `rules`: what a harmony completion must look like (see `stream_batch`); `speculate`: for one prompt,
    draft up to that many tokens a step (see `stream`).
    """
    params = SamplingParams(temperature, top_k, top_p, min_p, seed)
    stop = model.generation_config.eos_token_ids if stop_tokens is None else stop_tokens
    if speculate and _is_single(prompt_ids):
        return list(stream(model, prompt_ids, max_new_tokens, params, stop, chunk, cache, rules,
                           Speculation(speculate)))
    prompts = _as_batch(prompt_ids)
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in stream_batch(model, prompts, max_new_tokens, params, stop, chunk, cache, rules):
        for out, token in zip(outputs, step):
            if token is not None:
                out.append(token)
    return outputs[0] if _is_single(prompt_ids) else outputs
