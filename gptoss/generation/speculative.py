"""Lossless speculative decoding without a draft model: prompt-lookup (n-gram) drafts, verified in one pass.

Drafting (`NgramDrafter`): the continuation of the latest earlier occurrence of the text's last n tokens
(3, else 2). Text that repeats what came before (a code file rewritten with one change, a summary
quoting its document, a tool's output echoed back) goes on the way it went then.

Verifying (`accept`): the newest token and a draft of k tokens go through the model in one forward pass,
which gives the logits after each of them. The longest prefix of the draft that the model itself would
have produced is kept, plus one token of the model's own after it: a step makes 1 to k + 1 tokens for
one pass. The rule is exact:
- greedy: a draft token is kept if it is the argmax after the tokens before it, so the output is plain
  greedy decoding's (bit for bit: a pass of up to MAX_DRAFT + 1 tokens computes as decode steps do);
- sampling: speculative sampling (Leviathan et al., Chen et al., 2023) with the draft as a point mass:
  draft token d is kept with probability p(d); if it is not, the token is drawn from p without d
  (renormalized). Each token is then distributed exactly as plain sampling's.

What a pass costs: the dense weights are read once for all its tokens, but each token routes to its own
experts, so a pass of k + 1 tokens reads up to k + 1 tokens' worth of expert weights. Drafts come only
from n-grams of two tokens or more, and a draft that keeps being rejected shrinks (`Speculation`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from gptoss.generation.sampling import SamplingParams, distribution
from gptoss.kernels.ops import GEMV_MAX_ROWS

NGRAM_SIZES = (3, 2)  # longest first: a longer match predicts better
# A pass of up to GEMV_MAX_ROWS tokens runs the decode kernels, which compute each row as a one-token step
# does, so its logits are a decode step's bit for bit (measured on gpt-oss-20b in bf16; a pass of 5 takes
# the GEMM and its argmax can differ on a near tie). Drafts stop there, so greedy speculation is exact.
MAX_DRAFT = GEMV_MAX_ROWS - 1


class NgramDrafter:
    """An index of every n-gram of the text so far (n in NGRAM_SIZES) to where its latest occurrence was
    followed, so a draft takes O(1) whatever the text's length."""

    def __init__(self, tokens: Iterable[int] = ()):
        self.tokens: list[int] = []
        self.follows: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token that followed it
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            self.tokens.append(int(token))
            end = len(self.tokens) - 1  # the new token follows the n-grams ending just before it
            for n in NGRAM_SIZES:
                if end >= n:
                    self.follows[tuple(self.tokens[end - n:end])] = end

    def draft(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the text's last n tokens."""
        if limit < 1:
            return []
        for n in NGRAM_SIZES:
            start = self.follows.get(tuple(self.tokens[-n:]))
            if start is not None and len(self.tokens) >= n:
                return self.tokens[start:start + limit]
        return []


def accept(logits: torch.Tensor, draft: Sequence[int], params: SamplingParams,
           generator: torch.Generator | None = None) -> list[int]:
    """The tokens a verifying pass makes: logits [k + 1, V] after the newest token and after each of the
    k draft tokens -> the accepted prefix of the draft and one token of the model's own (see the module's
    docstring for the rule)."""
    if params.temperature == 0:
        predicted = logits.argmax(dim=-1).tolist()
        kept = 0
        while kept < len(draft) and predicted[kept] == draft[kept]:
            kept += 1
        return [*draft[:kept], predicted[kept]]
    probs = distribution(logits, params)                                       # [k + 1, V]
    for j, token in enumerate(draft):
        if torch.rand((), generator=generator, device=probs.device) >= probs[j, token]:
            residual = probs[j].clone()
            residual[token] = 0
            return [*draft[:j], int(torch.multinomial(residual, 1, generator=generator))]
    return [*draft, int(torch.multinomial(probs[-1], 1, generator=generator))]


@dataclass
class Speculation:
    """How long the next draft may be, and what the drafts did. A draft that the model rejects at once
    halves the length (down to 1); one it takes whole doubles it back (up to `max_draft`, at most
    MAX_DRAFT)."""

    max_draft: int
    drafter: Callable[[list[int]], NgramDrafter] = NgramDrafter  # made from the prompt; extend()ed, draft()ed
    length: int = 0
    passes: int = 0      # verifying passes run
    drafted: int = 0     # draft tokens proposed
    accepted: int = 0    # of which the model kept

    def __post_init__(self):
        self.max_draft = min(self.max_draft, MAX_DRAFT)
        self.length = self.length or self.max_draft

    def record(self, drafted: int, kept: int) -> None:
        self.passes += 1
        self.drafted += drafted
        self.accepted += kept
        if drafted and kept == 0:
            self.length = max(1, self.length // 2)
        elif drafted and kept == drafted:
            self.length = min(self.max_draft, self.length * 2)

    @property
    def tokens_per_pass(self) -> float:
        """New tokens a pass made on average (1.0 without speculation)."""
        return (self.accepted + self.passes) / max(self.passes, 1)
