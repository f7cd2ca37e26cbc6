"""Shared helpers: tiny random models through transformers' GptOssForCausalLM, and tiny checkpoints."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import replace

import pytest
import torch

from gptoss.model.config import ModelConfig, preset


def tiny_config(**overrides) -> ModelConfig:
    """The tiny preset with a small vocabulary (so transformers' padding id fits) and any overrides."""
    base = dict(vocab_size=512, pad_token_id=511, layer_types=())
    return replace(preset("tiny"), **(base | overrides))


def hf_config(cfg: ModelConfig):
    """transformers' GptOssConfig for the same geometry, eager attention (the one with sinks)."""
    from transformers import GptOssConfig

    hc = GptOssConfig(**{k: v for k, v in cfg.to_hf_config(quantized=False).items()
                         if k not in ("architectures", "model_type", "initial_context_length")})
    hc._attn_implementation = "eager"
    return hc


def random_hf_model(cfg: ModelConfig, seed: int = 0):
    """A GptOssForCausalLM with weights scaled like a trained net (1/sqrt(fan_in)), so every part matters."""
    from transformers import GptOssForCausalLM

    torch.manual_seed(seed)
    model = GptOssForCausalLM(hf_config(cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks") or name.endswith("embed_tokens.weight"):
                p.normal_(0, 1)
            elif name.endswith("norm.weight"):
                p.normal_(1, 0.1)
            elif p.dim() == 1 or name.endswith("_bias"):
                p.normal_(0, 0.1)
            elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, in, out]
                p.normal_(0, 1 / math.sqrt(p.shape[1]))
            else:  # [out, in]
                p.normal_(0, 1 / math.sqrt(p.shape[-1]))
    return model


@pytest.fixture
def tmp_checkpoint(tmp_path):
    """Writes a random checkpoint of `cfg` in `layout` under tmp_path and returns its directory."""
    from gptoss.weights.random_checkpoint import write_random_checkpoint

    def make(cfg: ModelConfig, layout: str = "hf", seed: int = 0, name: str | None = None, **kw):
        return write_random_checkpoint(cfg, tmp_path / (name or f"{layout}-{seed}"), layout=layout, seed=seed, **kw)

    return make


@contextlib.contextmanager
def running_server(app):
    """`app` under uvicorn in a thread, on a free loopback port; yields its base URL; always shut down."""
    import uvicorn

    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not uv.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{uv.servers[0].sockets[0].getsockname()[1]}"
    finally:
        uv.should_exit = True
        thread.join(30)
    assert not thread.is_alive()


@pytest.fixture(scope="session")
def tiny_random_checkpoint(tmp_path_factory):
    """The tiny preset with the real vocabulary, random weights (seed 3): the checkpoint behind the server
    tests (and their subprocesses)."""
    from gptoss.weights.random_checkpoint import write_random_checkpoint

    return write_random_checkpoint(preset("tiny"), tmp_path_factory.mktemp("tiny-model") / "tiny", seed=3)


@pytest.fixture(scope="session")
def tiny_random_model(tiny_random_checkpoint):
    """That checkpoint in fp32, so that greedy outputs compare token for token."""
    from gptoss import load_model

    return load_model(tiny_random_checkpoint, dtype=torch.float32)


@pytest.fixture
def forced_tokens(monkeypatch):
    """Makes the engine sample given text's tokens (harmony special tokens included) before sampling as
    usual again: a random model never calls a tool by itself. The model still runs; only the sampled
    tokens are replaced. Returns the function that queues more text."""
    from gptoss.chat.tokenizer import get_tokenizer
    from gptoss.server import engine as engine_module

    script = []
    real = engine_module.sample

    def sample(logits, params, generator=None):
        return torch.tensor([script.pop(0)]) if script else real(logits, params, generator)

    monkeypatch.setattr(engine_module, "sample", sample)
    return lambda *texts: script.extend(t for text in texts for t in get_tokenizer().encode(text, allowed_special="all"))
