"""A checkpoint laid out exactly as the openai/gpt-oss-20b repository publishes it: config.json as published
(a single eos_token_id), generation_config.json, three shards named as published with their index, the
original/ and metal/ folders beside them; loaded by path and from the Hugging Face cache, offline. Its
generation_config.json decides where generation stops and how it samples by default; the first touch of
cold weights reads them with a progress bar."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from gptoss import load_model
from gptoss.cli.options import sampling_params
from gptoss.model.config import preset
from gptoss.model.generation_config import GenerationConfig
from gptoss.server import Engine, create_app
from gptoss.server.schemas import ChatCompletionRequest
from gptoss.weights.checkpoint import CheckpointError, open_checkpoint
from gptoss.weights.pages import populate
from gptoss.weights.random_checkpoint import write_random_checkpoint

GPTOSS = [sys.executable, "-m", "gptoss.cli.main"]
REPO = "openai/gpt-oss-20b"
ENDOFTEXT, RETURN, CALL = 199999, 200002, 200012

# openai/gpt-oss-20b's config.json, key for key; only the sizes are the tiny preset's.
PUBLISHED_CONFIG = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
    "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
    "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
    "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
}
PUBLISHED_GENERATION_CONFIG = {"bos_token_id": 199998, "do_sample": True, "eos_token_id": [200002, 199999, 200012],
                               "pad_token_id": 199999, "transformers_version": "4.55.0.dev0"}
SHARDS = [f"model-0000{i}-of-00002.safetensors" for i in range(3)]


def publish_like_openai(root: Path, seed: int = 4) -> Path:
    """A repository folder with the published file names, the tiny geometry and random weights."""
    cfg = preset("tiny")
    hf = write_random_checkpoint(cfg, root.parent / f"{root.name}-hf", seed=seed)
    write_random_checkpoint(cfg, root / "original", layout="original", seed=seed)
    (root / "original" / "dtypes.json").write_text("{}")
    (root / "metal").mkdir()
    (root / "metal" / "model.bin").write_bytes(os.urandom(1024))   # not safetensors: must never be read
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "README.md", "LICENSE", "USAGE_POLICY"):
        (root / name).write_text("{}" if name.endswith(".json") else "published file\n")

    config = PUBLISHED_CONFIG | {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
                                 "head_dim": cfg.head_dim, "num_attention_heads": cfg.num_heads,
                                 "num_key_value_heads": cfg.num_kv_heads, "num_local_experts": cfg.num_experts,
                                 "num_experts_per_tok": cfg.experts_per_token,
                                 "experts_per_token": cfg.experts_per_token, "num_hidden_layers": cfg.num_layers,
                                 "layer_types": list(cfg.layer_types), "sliding_window": cfg.sliding_window,
                                 "max_position_embeddings": cfg.max_context}
    (root / "config.json").write_text(json.dumps(config, indent=2))
    (root / "generation_config.json").write_text(json.dumps(PUBLISHED_GENERATION_CONFIG, indent=2))
    tensors = load_file(hf / "model.safetensors")
    names = sorted(tensors)
    groups = [names[i::3] for i in range(3)]
    for shard, group in zip(SHARDS, groups):
        save_file({n: tensors[n] for n in group}, root / shard, metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
             "weight_map": {n: shard for shard, group in zip(SHARDS, groups) for n in group}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return root


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    return publish_like_openai(tmp_path_factory.mktemp("published") / "gpt-oss-20b")


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, published) -> Path:
    """The Hugging Face cache as `hf download openai/gpt-oss-20b` leaves it (the snapshot's files as
    links into blobs), holding only what gptoss loads."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    repo = cache / "models--openai--gpt-oss-20b"
    commit = "d666cf3b67006cf8227666739edf25164aaffdeb"
    snapshot, blobs = repo / "snapshots" / commit, repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, name in enumerate(["config.json", "generation_config.json", "model.safetensors.index.json", *SHARDS]):
        blob = blobs / f"{i:040x}"
        blob.write_bytes((published / name).read_bytes())
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return cache


def test_the_published_layout_loads_with_its_generation_config(published):
    ckpt = open_checkpoint(published)
    assert ckpt.layout == "hf" and {f.name for f in {t.file for t in ckpt.tensors.values()}} == set(SHARDS)
    assert ckpt.config.eos_token_ids == (RETURN,)                          # config.json as published
    model = load_model(published, dtype=torch.float32)
    assert model.generation_config.eos_token_ids == (RETURN, ENDOFTEXT, CALL)   # generation_config.json wins
    assert model.generation_config.do_sample is True and model.generation_config.bos_token_id == 199998
    ids = torch.randint(0, 201088, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the same weights as its original/ copy
        assert torch.equal(model(ids), load_model(published / "original", dtype=torch.float32)(ids))


def test_without_generation_config_the_stops_are_config_jsons(published, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ["config.json", "model.safetensors.index.json", *SHARDS]:
        (bare / f).symlink_to(published / f)
    assert load_model(bare).generation_config == GenerationConfig(eos_token_ids=(RETURN,), pad_token_id=199999)


@pytest.mark.parametrize("with_file, finish", [(True, "stop"), (False, "length")])
def test_raw_completions_stop_at_endoftext_because_of_generation_config(published, tmp_path, with_file, finish):
    """The bug the issue reports: with config.json's single eos, /v1/completions ran past <|endoftext|>."""
    directory = tmp_path / "repo"
    directory.mkdir()
    files = ["config.json", "model.safetensors.index.json", *SHARDS] + (["generation_config.json"] if with_file else [])
    for f in files:
        (directory / f).symlink_to(published / f)
    engine = Engine(load_model(directory, dtype=torch.float32), max_batch=1, context=128)
    with TestClient(create_app(engine, "tiny")) as client:
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4,
                                                 "logit_bias": {str(ENDOFTEXT): 100}, "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == finish
    assert r.json()["usage"]["completion_tokens"] == (1 if with_file else 4)


def test_loaded_from_the_hub_cache_offline(hub_cache, tmp_path):
    """`--model openai/gpt-oss-20b` and `gptoss pull` find the cached snapshot without the network."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache), "HF_HOME": str(tmp_path)}
    pull = subprocess.run([*GPTOSS, "pull", REPO], capture_output=True, text=True, env=env, timeout=120)
    assert pull.returncode == 0, pull.stderr
    snapshot = Path(pull.stdout.strip())
    assert snapshot.parent == hub_cache / "models--openai--gpt-oss-20b" / "snapshots"
    run = subprocess.run([*GPTOSS, "generate", "--model", REPO, "--max-tokens", "3", "--threads", "1", "Hi"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("Hi")
    inspect = subprocess.run([*GPTOSS, "inspect", str(snapshot)], capture_output=True, text=True, env=env, timeout=120)
    assert f"stops at tokens [{RETURN}, {ENDOFTEXT}, {CALL}]; sampling defaults: do_sample True" in inspect.stdout


def test_pull_offline_without_a_cached_copy_is_one_clear_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HOME": str(tmp_path)}
    run = subprocess.run([*GPTOSS, "pull", REPO], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().count("\n") == 0 and "cannot be downloaded" in run.stderr and REPO in run.stderr
    bad = subprocess.run([*GPTOSS, "pull", "not a repo"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "not a Hugging Face repo id" in bad.stderr


def test_the_download_asks_only_for_what_is_loaded(monkeypatch, tmp_path):
    """What `pull` asks the Hub for, matched against the published repository's file list."""
    import fnmatch

    import huggingface_hub

    from gptoss.weights import hub

    asked = {}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: asked.update(kw) or str(tmp_path))
    hub.download(REPO)
    published_files = ["config.json", "generation_config.json", "model.safetensors.index.json", *SHARDS,
                       "original/config.json", "original/dtypes.json", "original/model.safetensors",
                       "metal/model.bin", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                       "chat_template.jinja", "README.md", "LICENSE", "USAGE_POLICY", ".gitattributes"]
    wanted = [f for f in published_files if any(fnmatch.fnmatch(f, p) for p in asked["allow_patterns"])
              and not any(fnmatch.fnmatch(f, p) for p in asked["ignore_patterns"])]
    assert wanted == ["config.json", "generation_config.json", "model.safetensors.index.json", *SHARDS]


# ---- the sampling defaults: the request's (or the command line's) values first, then the file's ------------


def test_sampling_defaults_come_from_the_file_and_requests_override_them():
    cfg = preset("tiny")
    nothing = GenerationConfig.for_model(cfg)
    sample = GenerationConfig(cfg.eos_token_ids, do_sample=True)
    tuned = GenerationConfig(cfg.eos_token_ids, do_sample=True, temperature=0.6, top_p=0.9, top_k=40)
    greedy = GenerationConfig(cfg.eos_token_ids, do_sample=False)
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    assert body.sampling(nothing).temperature == 1.0 and body.sampling(nothing).top_p is None  # OpenAI's defaults
    assert body.sampling(greedy).temperature == 0.0
    p = body.sampling(tuned)
    assert (p.temperature, p.top_p, p.top_k) == (0.6, 0.9, 40)
    given = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], temperature=0.2, top_p=1)
    p = given.sampling(tuned)
    assert (p.temperature, p.top_p, p.top_k) == (0.2, None, 40)

    args = Namespace(temperature=None, top_k=None, top_p=None, min_p=None, seed=None)
    assert sampling_params(args, nothing).temperature == 0.0                    # the CLI's own default: greedy
    assert sampling_params(args, sample).temperature == 1.0                     # transformers' do_sample default
    assert (sampling_params(args, tuned).temperature, sampling_params(args, tuned).top_k) == (0.6, 40)
    args.temperature, args.top_k = 0.0, 5
    assert (sampling_params(args, tuned).temperature, sampling_params(args, tuned).top_k) == (0.0, 5)


@pytest.mark.parametrize("raw, fragment", [
    ("{not json", "cannot read"),
    ('{"eos_token_id": "200002"}', "eos_token_id '200002' is not a token id"),
    ('{"eos_token_id": [200002, -1]}', "eos_token_id -1 is not a token id"),
    ('{"temperature": -1}', "temperature must be a number"),
    ('{"top_p": 0}', "top_p must be within"),
    ('{"top_k": 2.5}', "top_k must be a number"),
    ('{"do_sample": "yes"}', "do_sample must be true or false"),
    ('[1, 2]', "not a JSON object"),
])
def test_a_bad_generation_config_is_one_line_naming_it(published, tmp_path, raw, fragment):
    directory = tmp_path / "repo"
    directory.mkdir()
    for f in ["config.json", "model.safetensors.index.json", *SHARDS]:
        (directory / f).symlink_to(published / f)
    (directory / "generation_config.json").write_text(raw)
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(directory)
    message = str(info.value)
    assert "generation_config.json" in message and fragment in message and "\n" not in message


# ---- the first touch of cold weights ----------------------------------------------------------------------


def resident_fraction(path: Path) -> float:
    """How much of the file is in the page cache (mincore over a fresh mapping)."""
    import ctypes
    import mmap

    import numpy as np

    libc = ctypes.CDLL(None, use_errno=True)
    mapped = np.memmap(path, mode="r")
    pages = -(-len(mapped) // mmap.PAGESIZE)
    vector = (ctypes.c_ubyte * pages)()
    assert libc.mincore(ctypes.c_void_p(mapped.ctypes.data), ctypes.c_size_t(len(mapped)), vector) == 0
    del mapped
    return sum(vector) / pages


def drop_from_page_cache(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise to make a file cold")
def test_cold_weights_are_read_in_with_a_progress_bar(published, capsys):
    shards = [published / s for s in SHARDS]
    gc.collect()  # models of earlier tests map these files, and a mapped page is not dropped
    for shard in shards:
        drop_from_page_cache(shard)
    if max(resident_fraction(s) for s in shards) > 0.5:
        pytest.skip("this file system keeps the files cached (fadvise DONTNEED did nothing)")
    model = load_model(published, progress=True)
    assert "reading weights into memory" in capsys.readouterr().err
    assert min(resident_fraction(s) for s in shards) > 0.99        # all of it in memory before any forward
    weights = list(model.state_dict().values())
    assert populate(weights, progress=False) >= sum(t.nbytes for t in weights) // 2  # unique storages, page-aligned
