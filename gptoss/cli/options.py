"""Options and helpers shared by the `gptoss` subcommands."""

from __future__ import annotations

import re
import sys

import torch

from gptoss.distributed import Parallel
from gptoss.errors import GptossError
from gptoss.generation.cache import allocated_kv_bytes
from gptoss.generation.sampling import SamplingParams, with_defaults
from gptoss.model.generation_config import GenerationConfig
from gptoss.weights.checkpoint import load_model
from gptoss.weights.hub import resolve_model
from gptoss.weights.pages import available_memory

DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}


def add_model_options(p) -> None:
    p.add_argument("--model", help="local directory (Hugging Face or original/ layout), a Hugging Face id such as "
                                   "openai/gpt-oss-20b, or random-small (random weights, made on first use); "
                                   "default: the embedded nano model (docs/nano.md)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="dense weights and activations (default: as stored)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    p.add_argument("--int8", action="store_true", help="hold the attention projections and the unembedding in int8 "
                                                       "blocks of 32 (1.125 bytes a weight instead of 2)")


def add_sampling_options(p, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, help="0 = greedy; default: the checkpoint's generation_config.json "
                                                     "(gpt-oss's says do_sample, so 1.0), else 0")
    p.add_argument("--top-k", type=int, help="default: the checkpoint's generation_config.json, else none")
    p.add_argument("--top-p", type=float, help="default: the checkpoint's generation_config.json, else none")
    p.add_argument("--min-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--speculate", type=int, default=0, metavar="N",
                   help="draft up to N tokens a step by prompt lookup (text that repeats its context) and verify "
                        "them in one pass: the same greedy output and sampling distribution (default 0: off)")


def speculation(args):
    """The --speculate setting as a `Speculation` (None: off), kept across calls so it adapts."""
    from gptoss.generation.speculative import Speculation

    if args.speculate < 0:
        raise GptossError(f"--speculate takes a number of tokens >= 0, got {args.speculate}")
    return Speculation(args.speculate) if args.speculate else None


def sampling_params(args, defaults: GenerationConfig) -> SamplingParams:
    """The sampling options given, and for those not given the checkpoint's generation_config.json."""
    return with_defaults(defaults, 0.0, args.temperature, args.top_k, args.top_p, min_p=args.min_p, seed=args.seed)


def load_from_args(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    return load_for_ranks(resolve_model(args.model), getattr(args, "speculate", 0), dtype=DTYPES[args.dtype],
                          progress=sys.stderr.isatty(), int8_dense=args.int8)


def load_for_ranks(path, speculate: int = 0, **options):
    """`load_model`, or launched by torchrun (WORLD_SIZE > 1) this rank's part of the model: rank 0 gets
    a `Driver` to run the command with, every other rank follows rank 0's forward passes here until it
    stops, then exits (see gptoss/generation/lockstep.py). speculate: the command's --speculate, which
    cannot run across ranks (a draft's cache truncation copies pages that the followers do not replay)."""
    from gptoss.generation.lockstep import Driver, follow

    parallel = Parallel.from_environment()
    if parallel.size == 1:
        return load_model(path, **options)
    if speculate:
        raise GptossError("--speculate does not run across ranks (its cache truncation is not replayed on them)")
    if parallel.rank:
        options["progress"] = False
    model = load_model(path, device=parallel.device, parallel=parallel, **options)
    if parallel.rank == 0:
        return Driver(model, parallel)
    follow(model, parallel)
    parallel.close()
    raise SystemExit(0)


def parse_list(text: str, option: str) -> list[str]:
    """A comma-separated option's items, blanks dropped; at least one."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise GptossError(f"{option} needs at least one value")
    return items


def parse_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise GptossError(f"{option} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise GptossError(f"{option} needs positive integers, got {text!r}")
    return values


BYTE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
              "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_bytes(text: str, option: str) -> int:
    """'4GiB', '512MiB', '2G' or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in BYTE_UNITS or float(m.group(1)) <= 0:
        raise GptossError(f"{option} takes a size such as 4GiB, 512MiB or 2G, got {text!r}")
    return int(float(m.group(1)) * BYTE_UNITS[m.group(2).lower()])


def add_kv_memory_option(p) -> None:
    p.add_argument("--kv-memory", help="bytes of the KV cache's page pool, e.g. 4GiB (default: what the requests "
                                       "can use, at most half of the memory available beside the model's weights)")


def kv_memory(args, model, sequences: int, tokens: int) -> int:
    """--kv-memory; by default room for `sequences` sequences of `tokens` tokens, but at most half of what
    the OS calls available once the model's weights are counted out (a memory-mapped checkpoint may sit in
    the page cache, which the OS counts as available) and at least 256 MiB."""
    if args.kv_memory:
        return parse_bytes(args.kv_memory, "--kv-memory")
    wanted = allocated_kv_bytes(model.config, tokens, sequences, dtype_bytes=model.dtype.itemsize)["total"]
    weights = sum(t.nbytes for t in model.state_dict().values())
    return min(wanted, max(256 * 2**20, (available_memory() - weights) // 2))


def add_builtin_tool_options(p) -> None:
    """gpt-oss's own tools, run by gptoss: the browser over a backend, the python sandbox."""
    tools = p.add_argument_group("built-in tools")
    tools.add_argument("--browser-backend", metavar="SPEC",
                       help="offer the browser tool (the Responses API's web_search) over local:DIR (HTML, Markdown "
                            "and text files; no network), exa ($EXA_API_KEY) or youcom ($YDC_API_KEY); default: none")
    tools.add_argument("--python-tool", action="store_true",
                       help="offer the python tool (the Responses API's code_interpreter), run in a sandbox without "
                            "network (docs/server.md says what it protects); default: off")
    tools.add_argument("--python-timeout", type=float, default=30.0,
                       help="seconds one python call may run before its interpreter is killed (default 30)")


def browser_backend(args):
    """The backend --browser-backend names (None: none); a clear error for a bad one."""
    from gptoss.tools.browser import backend_from_spec

    return backend_from_spec(args.browser_backend) if args.browser_backend else None


def python_limits(args):
    """The sandbox limits of --python-tool (None: off); an error if this machine cannot sandbox."""
    from gptoss.tools.python_sandbox import SandboxLimits, sandbox_unavailable

    if not args.python_tool:
        return None
    if why := sandbox_unavailable():
        raise GptossError(f"--python-tool: the python sandbox cannot run on this machine: {why}")
    return SandboxLimits(timeout_s=args.python_timeout)
