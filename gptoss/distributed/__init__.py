"""Running one model across processes and machines on torch.distributed (see docs/distributed.md)."""

from gptoss.distributed.parallel import SINGLE, DistributedError, Parallel

__all__ = ["SINGLE", "DistributedError", "Parallel"]
