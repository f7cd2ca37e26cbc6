"""Reading a GPT-OSS checkpoint directory in either layout, checked before any forward pass.

`open_checkpoint` finds the files, tells the layout apart from the tensor names, and compares every
tensor's name, shape and dtype with what config.json implies, raising a one-line `CheckpointError`
naming the file and tensor. `load_model` builds the model on the meta device and assigns the
memory-mapped tensors to it, so the weights are never held twice.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from gptoss.distributed import SINGLE, Parallel
from gptoss.errors import GptossError
from gptoss.model.config import ConfigError, ModelConfig, read_config_json
from gptoss.model.generation_config import FILE as GENERATION_CONFIG, GenerationConfig
from gptoss.model.transformer import Transformer
from gptoss.quant import mxfp4
from gptoss.quant.int8 import Int8Weight
from gptoss.weights.layout import HF, ORIGINAL, checkpoint_plan, checkpoint_tensor_specs, is_norm
from gptoss.weights.pages import populate, release_pages

INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


class CheckpointError(GptossError):
    """A checkpoint directory that cannot be loaded as it is."""


@dataclass
class TensorInfo:
    file: Path
    dtype: str           # safetensors' name: "BF16", "U8", ...
    shape: tuple[int, ...]


class Checkpoint:
    """A validated checkpoint directory: its config, layout, and a map of tensor name -> file."""

    def __init__(self, directory: Path, config: ModelConfig, generation_config: GenerationConfig, layout: str,
                 quantized: bool, tensors: dict[str, TensorInfo]):
        self.directory, self.config, self.layout, self.quantized = directory, config, layout, quantized
        self.generation_config = generation_config
        self.tensors = tensors
        self._handles: dict[Path, object] = {}

    @property
    def float_dtype(self) -> torch.dtype:
        """The dtype the checkpoint stores its dense weights in (that of the embedding)."""
        name = "model.embed_tokens.weight" if self.layout == HF else "embedding.weight"
        return FLOAT_DTYPES[self.tensors[name].dtype]

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in {t.file for t in self.tensors.values()})

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor as stored, memory-mapped from its file (safetensors maps it, no copy)."""
        info = self.tensors[name]
        if info.file not in self._handles:
            self._handles[info.file] = safe_open(info.file, framework="pt")
        return self._handles[info.file].get_tensor(name)

    def model_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(our state_dict name, tensor) pairs, renamed, split or transposed from the stored layout."""
        for stored in checkpoint_plan(self.config, self.layout, self.quantized):
            yield from stored.to_ours(self.tensor(stored.name))


def open_checkpoint(path: str | Path) -> Checkpoint:
    directory = root = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    if not (directory / "config.json").exists() and (directory / "original" / "config.json").exists():
        directory = directory / "original"
    if not (directory / "config.json").exists():
        raise CheckpointError(f"{directory}: no config.json (expected a Hugging Face or OpenAI original/ checkpoint)")
    try:
        config = ModelConfig.from_json_file(directory / "config.json")
        # Beside config.json, or at the repository's root above original/ (where the published repos keep it).
        found = [d / GENERATION_CONFIG for d in (directory, root) if (d / GENERATION_CONFIG).exists()]
        generation_config = (GenerationConfig.from_json_file(found[0], config) if found
                             else GenerationConfig.for_model(config))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None

    tensors = _index_tensors(directory)
    if "model.embed_tokens.weight" in tensors:
        layout = HF
        quantized = any(name.endswith("_blocks") for name in tensors)
    elif "embedding.weight" in tensors:
        layout, quantized = ORIGINAL, True
    else:
        raise CheckpointError(f"{directory}: tensors are in no known layout (neither model.embed_tokens.weight "
                              f"nor embedding.weight found)")
    quantization = read_config_json(directory / "config.json").get("quantization_config")
    quantization = quantization if isinstance(quantization, dict) else {}
    if quantization.get("quant_method") == "mxfp4" and not quantization.get("dequantize") and not quantized:
        raise CheckpointError(f"{directory / 'config.json'}: quantization_config says the experts are MXFP4, "
                              f"but the tensors hold them dense (no *_blocks / *_scales)")
    try:  # a geometry that MXFP4 cannot hold (widths not a multiple of its block) is the config's fault
        specs = checkpoint_tensor_specs(config, layout, quantized)
    except ConfigError as e:
        raise CheckpointError(f"{directory / 'config.json'}: {e}") from None
    _validate(directory, config, tensors, specs)
    return Checkpoint(directory, config, generation_config, layout, quantized, tensors)


def _index_tensors(directory: Path) -> dict[str, TensorInfo]:
    """Every tensor in the directory's safetensors files, from their headers only."""
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted({directory / f for f in weight_map.values()})
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{index}: names shard {f.name}, which is missing")
    else:
        weight_map = None
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{directory}: no *.safetensors files and no {INDEX_FILE}")

    tensors: dict[str, TensorInfo] = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as handle:
                for name in handle.keys():
                    sl = handle.get_slice(name)
                    if name in tensors:
                        raise CheckpointError(f"{f}: tensor {name!r} also appears in {tensors[name].file.name}")
                    tensors[name] = TensorInfo(f, sl.get_dtype(), tuple(sl.get_shape()))
        except SafetensorError as e:
            raise CheckpointError(f"{f}: truncated or corrupt safetensors file ({e})") from None
    if weight_map is not None:
        for name, file in weight_map.items():
            if name not in tensors or tensors[name].file.name != file:
                raise CheckpointError(f"{index}: says tensor {name!r} is in {file}, but it is not there")
    return tensors


def _validate(directory: Path, cfg: ModelConfig, tensors: dict[str, TensorInfo], expected: dict) -> None:
    missing = [n for n in expected if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{directory}: missing tensor {missing[0]!r}{more}{_layer_hint(cfg, tensors)}")
    unexpected = [n for n in tensors if n not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        name = unexpected[0]
        raise CheckpointError(f"{tensors[name].file}: unexpected tensor {name!r}{more}{_layer_hint(cfg, tensors)}")
    for name, spec in expected.items():
        info = tensors[name]
        if info.shape != spec.shape:
            raise CheckpointError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, "
                                  f"but config.json implies {list(spec.shape)}")
        ok = info.dtype == "U8" if spec.kind == "uint8" else info.dtype in FLOAT_DTYPES
        if not ok:
            want = "U8 (MXFP4)" if spec.kind == "uint8" else "BF16, F16 or F32"
            raise CheckpointError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, expected {want}")


def _layer_hint(cfg: ModelConfig, tensors: dict[str, TensorInfo]) -> str:
    """When the layer count is what disagrees, say so: it is the usual way a config contradicts the tensors."""
    layers = {int(m.group(1)) for n in tensors if (m := re.match(r"(?:model\.layers|block)\.(\d+)\.", n))}
    if layers and max(layers) + 1 != cfg.num_layers:
        return f"; config.json says {cfg.num_layers} layers but the tensors hold {max(layers) + 1}"
    return ""


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               dequantize_experts: bool = False, progress: bool = False, kernels: bool = True,
               int8_dense: bool = False, parallel: Parallel = SINGLE) -> Transformer:
    """Loads a checkpoint directory (Hugging Face or OpenAI original/ layout) into a `Transformer`.

    dtype: of the dense weights and activations; default: the checkpoint's own (bf16 as published).
    MXFP4 experts stay packed unless `dequantize_experts` asks for dense experts in `dtype`.
    progress: progress bars on stderr while the tensors are assigned and while the weights are first read
    into memory (`pages.populate`: done in any case where they fit, so the first forward pass finds them).
    kernels: use the fused CPU kernels where they apply (False: the pure-PyTorch reference path).
    int8_dense: hold the attention projections and the unembedding in int8 blocks (gptoss.quant.int8).
    parallel: load this rank's part of the model only (`gptoss.distributed`): its slice of each split tensor,
    still a view of the mapped file where the slice is contiguous, so the rank reads and holds its share.
    """
    ckpt = open_checkpoint(path)
    dtype = dtype or ckpt.float_dtype
    quantized = ckpt.quantized and not dequantize_experts
    with torch.device("meta"):
        model = Transformer(ckpt.config, quantized_experts=quantized, parallel=parallel)
    shapes = {name: t.shape for name, t in model.state_dict().items()}

    state: dict[str, torch.Tensor] = {}
    tensors = ckpt.model_tensors()
    if progress:
        tensors = tqdm(tensors, total=len(model.state_dict()), desc=f"loading {ckpt.directory.name}", unit=" tensors",
                       file=sys.stderr, leave=False)
    for name, tensor in tensors:
        shape = shapes.get(name)
        if shape is None and name.endswith(("_blocks", "_scales")):  # dequantized below: this rank's experts
            shape = (shapes[name.rsplit("_", 1)[0]][0], *tensor.shape[1:])
        if shape is None:  # a tensor another rank holds alone (o_proj's bias: rank 0 adds it)
            continue
        part = _rank_part(tensor, shape, parallel.rank)
        if part.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr():
            release_pages(tensor)  # a copied part (o_proj's columns): the whole stays mapped but not resident
        tensor = part
        if tensor.dtype == torch.uint8:
            state[name] = tensor
        else:  # .to() returns the mapped tensor itself when the dtype already matches
            state[name] = tensor.to(torch.float32 if is_norm(name) else dtype)
    if ckpt.quantized and not quantized:
        for key in [k for k in state if k.endswith("_blocks")]:
            base = key.removesuffix("_blocks")
            state[base] = mxfp4.dequantize(state.pop(key), state.pop(base + "_scales"), dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)
    model.generation_config = ckpt.generation_config
    if int8_dense:
        for layer in model.int8_layers():
            bf16 = layer.weight
            layer.hold_int8(Int8Weight.quantize(bf16.detach()))
            release_pages(bf16)
    model = model.to(device).eval().use_kernels(kernels)
    populate(list(model.state_dict().values()), progress)
    return model


def _rank_part(tensor: torch.Tensor, shape: tuple[int, ...], rank: int) -> torch.Tensor:
    """This rank's part of a stored tensor whose model counterpart has `shape`: along the one dimension where
    they differ, the rank-th of the equal parts (`Parallel.part`); the whole tensor where they agree. A part
    of rows (experts, heads' rows, vocabulary rows) stays a view of the mapped file; a part of columns
    (o_proj's) is copied, contiguous for the kernels."""
    for dim, (whole, here) in enumerate(zip(tensor.shape, shape)):
        if whole != here:
            return tensor.narrow(dim, rank * here, here).contiguous()
    return tensor
