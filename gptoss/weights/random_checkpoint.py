"""Random-weight checkpoints of any GPT-OSS geometry, in the real tensor names, shapes and dtypes.

Written tensor by tensor straight to disk (a safetensors header is computed up front, then each tensor
is generated and appended), so a full-size gpt-oss-20b checkpoint never sits in memory. Each tensor is
drawn from its own generator seeded by (seed, our name for it), so the same seed gives the same
weights in either layout: the HF and original/ checkpoints of one seed hold the same model.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Callable

import torch

from gptoss.errors import GptossError
from gptoss.model.config import ModelConfig
from gptoss.model.generation_config import FILE as GENERATION_CONFIG, GenerationConfig
from gptoss.weights.checkpoint import INDEX_FILE
from gptoss.weights.layout import HF, TensorSpec, checkpoint_plan, is_norm, model_tensor_specs

FP4_RMS = 2.93  # root mean square of the 16 FP4 values, uniformly drawn


def random_tensor(name: str, spec: TensorSpec, seed: int) -> torch.Tensor:
    """One tensor with magnitudes that keep activations O(1) through the network."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    shape = spec.shape
    if name.endswith("_blocks"):
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    if name.endswith("_scales"):
        # Choose 2**e so the weights' standard deviation is about 1 / sqrt(fan_in).
        fan_in = shape[-1] * 32
        exponent = round(math.log2(1 / (FP4_RMS * math.sqrt(fan_in))))
        return (127 + exponent + torch.randint(-1, 2, shape, generator=gen)).to(torch.uint8)
    if is_norm(name):
        t = 1 + 0.1 * torch.randn(shape, generator=gen)
    elif name.endswith("sinks"):
        t = torch.randn(shape, generator=gen)
    elif name.endswith("bias"):
        t = 0.1 * torch.randn(shape, generator=gen)
    elif name == "model.embed_tokens.weight":
        t = torch.randn(shape, generator=gen)
    else:  # a weight [.., out, in]
        t = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
    return t.to(torch.bfloat16)


SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.uint8: "U8"}


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * torch.tensor([], dtype=dtype).element_size()


def write_safetensors(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]]):
    """Streams tensors to a safetensors file: (name, dtype, shape, make) with make() called one at a time."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, _ in entries:
        size = _nbytes(dtype, shape)
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, dtype, shape, make in entries:
            t = make()
            assert t.dtype == dtype and tuple(t.shape) == tuple(shape), (name, t.dtype, t.shape)
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes())
    return offset


def _entries(cfg: ModelConfig, layout: str, seed: int):
    """(checkpoint name, dtype, shape, make) for every tensor of the layout, in a natural order."""
    ours = model_tensor_specs(cfg, quantized_experts=True)

    def make(stored):
        return lambda: stored.from_ours([random_tensor(name, ours[name], seed) for name in stored.ours])

    return [(stored.name, torch.uint8 if stored.spec.kind == "uint8" else torch.bfloat16, stored.spec.shape, make(stored))
            for stored in checkpoint_plan(cfg, layout, quantized_experts=True)]


def write_random_checkpoint(cfg: ModelConfig, out: str | Path, layout: str = HF, seed: int = 0,
                            shard_bytes: int = 4 << 30, progress: Callable[[str], None] | None = None) -> Path:
    """Writes config.json (and for HF generation_config.json) and the weights; HF checkpoints larger than
    `shard_bytes` are sharded with an index."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise GptossError(f"{out}: not empty; choose a new directory (old shards would mix with the new ones)")
    out.mkdir(parents=True, exist_ok=True)
    entries = _entries(cfg, layout, seed)
    config = cfg.to_hf_config(quantized=True) if layout == HF else cfg.to_original_config()
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if layout == HF:  # as the published repositories do (their original/ folder holds none)
        generation = GenerationConfig.published(cfg).to_json()
        (out / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")

    shards: list[list] = [[]]
    sizes = [0]  # bytes of each shard
    for e in entries:
        size = _nbytes(e[1], e[2])
        if layout == HF and shards[-1] and sizes[-1] + size > shard_bytes:
            shards.append([])
            sizes.append(0)
        shards[-1].append(e)
        sizes[-1] += size
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i:05d}-of-{len(shards) - 1:05d}.safetensors" for i in range(len(shards))]
    total = 0
    for name, shard, size in zip(names, shards, sizes):
        if progress:
            progress(f"writing {out / name} ({size / 2**30:.2f} GiB)")
        total += write_safetensors(out / name, shard)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {e[0]: name for name, shard in zip(names, shards) for e in shard}}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return out
