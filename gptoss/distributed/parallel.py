"""Which part of the model this process holds, and the collectives that join the parts.

Launched by `torchrun`, every process reads WORLD_SIZE and RANK (and torchrun's rendezvous address) from
the environment; `Parallel.from_environment()` joins the process group (gloo on the CPU, NCCL on GPUs)
with a timeout, so that a rank that dies or cannot be reached ends the job with one clear message instead
of a hang. Not launched by torchrun, it is `SINGLE`: one process holds everything and every collective
is a no-op.

Rank r of N holds, in every layer, the r-th of N equal contiguous parts of:
- the query heads and KV heads (N must divide the KV heads; each query group stays with its KV head),
  so q/k/v projections are split by rows, o_proj by columns, and o_proj's partial sums are all-reduced;
- the experts (rank r: experts r * E/N .. (r + 1) * E/N - 1). Contiguous rather than e % N so that a
  rank's share of every expert tensor is one contiguous range of the checkpoint file: it is a view of
  the memory-mapped file, never copied, and the pages it reads are its share. Routing picks experts
  close to uniformly, so either split balances the work as well;
- the vocabulary rows of the embedding (each rank looks up the ids it holds, zeros for the others, one
  all-reduce) and of the unembedding (each rank scores its rows, one all-gather).
Everything else (norms, the router, sinks' sharing aside) is held whole by every rank.

Every collective is counted (`traffic`: calls and payload bytes per kind) so the bytes a decoded token
sends can be measured, not estimated.
"""

from __future__ import annotations

import collections
import os
import pickle
from datetime import timedelta

import torch
import torch.distributed as dist

from gptoss.errors import GptossError

DEFAULT_TIMEOUT_S = 120.0  # a collective that waits longer than this counts as a lost rank


class DistributedError(GptossError):
    """The ranks cannot run together: a bad world size, a rendezvous that fails, a rank that died."""


class Parallel:
    """This process's place among `size` ranks, and the collectives. `SINGLE` (size 1) does nothing."""

    def __init__(self, rank: int = 0, size: int = 1, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.rank, self.size, self.timeout_s = rank, size, timeout_s
        self.traffic: collections.Counter = collections.Counter()  # "<op> calls" and "<op> bytes"

    @classmethod
    def from_environment(cls, timeout_s: float | None = None) -> "Parallel":
        """SINGLE unless launched with WORLD_SIZE > 1 (torchrun sets it, with RANK and MASTER_ADDR/PORT).
        $GPTOSS_DIST_TIMEOUT overrides the collective timeout (seconds)."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return SINGLE
        timeout_s = timeout_s or float(os.environ.get("GPTOSS_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        try:
            if not dist.is_initialized():
                dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError, OSError) as e:
            raise DistributedError(f"rank {os.environ.get('RANK', '?')} of {size}: cannot join the other ranks "
                                   f"({_first_line(e)})") from None
        return cls(dist.get_rank(), dist.get_world_size(), timeout_s)

    @property
    def device(self) -> torch.device:
        """Where this rank computes: its GPU under NCCL (LOCAL_RANK), else the CPU."""
        if self.size > 1 and dist.get_backend() == "nccl":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")

    def check(self, cfg) -> None:
        """A clear error at start for a world size that does not split the model into equal parts."""
        for what, count in (("KV heads", cfg.num_kv_heads), ("experts", cfg.num_experts),
                            ("vocabulary rows", cfg.vocab_size)):
            if count % self.size:
                raise DistributedError(f"{self.size} ranks cannot split {cfg.name}'s {count} {what} into equal "
                                       f"parts; use a world size that divides {cfg.num_kv_heads} (its KV heads), "
                                       f"{cfg.num_experts} (its experts) and {cfg.vocab_size}")

    def part(self, total: int) -> range:
        """The indices of `total` (heads, experts, vocabulary rows) this rank holds."""
        share = total // self.size
        return range(self.rank * share, (self.rank + 1) * share)

    def close(self) -> None:
        """Leaves the process group (at the end of the job: a group left to the interpreter's exit can abort it)."""
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    # --- the collectives -----------------------------------------------------------------------------

    def sum_partials(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of each rank's partial result `t`, added in fp32 (so a bf16 model
        rounds the total once, as one process does) and returned in t's dtype."""
        if self.size == 1:
            return t
        total = t.float()
        self._run("all_reduce", total, lambda: dist.all_reduce(total))
        return total.to(t.dtype)

    def gather_last_dim(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t` [..., n] joined along the last dimension in rank order: [..., size * n]."""
        if self.size == 1:
            return t
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        self._run("all_gather", t, lambda: dist.all_gather(parts, t))
        return torch.cat(parts, dim=-1)

    def broadcast_object(self, obj=None):
        """Rank 0's `obj` on every rank (pickled; other ranks pass nothing): a length, then the bytes."""
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8) if self.rank == 0 else None
        length = torch.tensor([0 if payload is None else payload.numel()], dtype=torch.int64)
        self._run("broadcast", length, lambda: dist.broadcast(length, 0))
        if payload is None:
            payload = torch.empty(int(length), dtype=torch.uint8)
        self._run("broadcast", payload, lambda: dist.broadcast(payload, 0))
        return obj if self.rank == 0 else pickle.loads(payload.numpy().tobytes())

    def _run(self, op: str, t: torch.Tensor, collective) -> None:
        """Runs a collective, counting it; a peer that died or stopped answering is a DistributedError."""
        self.traffic[f"{op} calls"] += 1
        self.traffic[f"{op} bytes"] += t.numel() * t.element_size()
        try:
            collective()
        except (RuntimeError, dist.DistBackendError) as e:
            raise DistributedError(f"rank {self.rank} of {self.size}: lost the other ranks during {op} "
                                   f"({_first_line(e)}); the job ends") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


SINGLE = Parallel()
