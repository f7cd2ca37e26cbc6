"""The model split across 2 and 4 gloo processes on this machine equals the single-process model.

Each test launches its ranks as torchrun does (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment),
running this file as the worker (`__main__` below) or the `gptoss` command itself, on a tiny fp32 random
checkpoint with 8 query and 4 KV heads and 16 experts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gptoss.model.config import preset

WORKER = Path(__file__).resolve()
PROMPT = [200006, 17360, 200008, 1234, 99, 4242, 17, 5, 8, 13, 21, 34, 55, 89, 144]


def split_config():
    return replace(preset("tiny"), name="tiny-split", num_heads=8, num_kv_heads=4, num_experts=16,
                   experts_per_token=4, num_layers=3, layer_types=())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from gptoss.weights.random_checkpoint import write_random_checkpoint

    return write_random_checkpoint(split_config(), tmp_path_factory.mktemp("split") / "ckpt", seed=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(size: int, command: list[str], timeout_s: float = 10, **env) -> list[subprocess.Popen]:
    """`size` ranks of `command`, with the environment torchrun gives each."""
    port = free_port()
    return [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=os.environ | env | dict(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(size),
                                                         MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                                         GPTOSS_DIST_TIMEOUT=str(timeout_s), OMP_NUM_THREADS="1"))
            for r in range(size)]


def finish(ranks: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str, str]]:
    results = []
    for p in ranks:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in ranks:
                q.kill()
            raise
        results.append((p.returncode, out, err))
    return results


@pytest.mark.parametrize("size", [2, 4])
def test_split_model_equals_single_process(checkpoint, tmp_path, size):
    """Logits of a full forward (batch of 2) and of a cached prefill + decode within 1e-5 of one process;
    40 greedy tokens identical."""
    from gptoss import load_model

    results = finish(launch(size, [sys.executable, str(WORKER), str(checkpoint), str(tmp_path / "out.pt")]))
    assert [rc for rc, _, _ in results] == [0] * size, results
    got = torch.load(tmp_path / "out.pt")
    want = worker_outputs(load_model(checkpoint, dtype=torch.float32))
    for name in ("logits", "cached_logits"):
        assert got[name].shape == want[name].shape
        assert (got[name] - want[name]).abs().max().item() < 1e-5, name
    assert got["greedy"] == want["greedy"] and len(got["greedy"]) == 40


def worker_outputs(model) -> dict:
    """What the worker computes, split or not: the model's logits without and with the KV cache, and 40
    greedy tokens."""
    from gptoss.generation.cache import KVCache
    from gptoss.generation.generate import generate

    ids = torch.tensor([PROMPT, PROMPT[::-1]])
    cache = KVCache.for_tokens(model.config, 64, chunk=8, dtype=model.dtype, kv_heads=model.kv_heads)
    sequence, steps = cache.sequence(), []
    for piece in (PROMPT[:8], PROMPT[8:], [7], [11]):  # two prefill chunks, two decode steps
        steps.append(model(torch.tensor([piece]), cache=cache.batch([sequence], [piece]))[0])
    return {"logits": model(ids), "cached_logits": torch.cat(steps),
            "greedy": generate(model, PROMPT, 40, stop_tokens=())}


def test_generate_command_under_ranks_prints_what_one_process_prints(checkpoint):
    """`gptoss generate` split over 2 ranks streams the text of the same 40 greedy tokens as one process."""
    from gptoss import get_tokenizer, load_model
    from gptoss.generation.generate import stream_text

    text = "Once upon a time"
    model = load_model(checkpoint, dtype=torch.float32)
    pieces = stream_text(model, get_tokenizer().encode(text, allowed_special="all"), 40,
                         stop_tokens=model.generation_config.eos_token_ids)
    want = text + "".join(piece for _, piece in pieces) + "\n"
    results = finish(launch(2, [sys.executable, "-m", "gptoss.cli.main", "generate", "--model", str(checkpoint),
                                "--dtype", "fp32", "--temperature", "0", "--max-tokens", "40", text]))
    assert [rc for rc, _, _ in results] == [0, 0], results
    assert results[0][1] == want
    assert results[1][1] == ""  # only rank 0 owns the terminal


def test_a_world_size_that_does_not_divide_the_heads_is_a_clear_error(checkpoint):
    results = finish(launch(3, [sys.executable, "-m", "gptoss.cli.main", "generate", "--model", str(checkpoint),
                                "--max-tokens", "2", "x"]))
    for rc, _, err in results:
        assert rc == 2
        assert err.strip().splitlines() == ["gptoss: error: 3 ranks cannot split ckpt's 4 KV heads into equal "
                                            "parts; use a world size that divides 4 (its KV heads), 16 (its experts) "
                                            "and 201088"]


@pytest.mark.parametrize("victim", [0, 1])
def test_a_killed_rank_ends_every_rank_with_one_line(checkpoint, victim):
    """A rank killed mid-generation (rank 0, the driver, or a follower): the others end within the
    collective timeout (5 s here), each with one line on stderr: no traceback, no hang."""
    ranks = launch(2, [sys.executable, "-m", "gptoss.cli.main", "generate", "--model", str(checkpoint), "--dtype",
                       "fp32", "--max-tokens", "4000", "x"], timeout_s=5)
    assert ranks[0].stdout.read(1) == "x"  # rank 0 has loaded and begun to stream: every rank is generating
    time.sleep(0.5)
    ranks[victim].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    survivors = [p for r, p in enumerate(ranks) if r != victim]
    results = finish(survivors, timeout=30)
    assert time.monotonic() - killed_at < 20
    for rc, _, err in results:
        assert rc != 0
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gptoss: error: rank ") and "lost the other ranks" in lines[0], err
    ranks[victim].wait()


def test_the_server_under_torchrun_answers_the_official_client_as_one_process_does(checkpoint):
    """`torchrun --nproc-per-node 2 gptoss serve`: a chat completion and a streamed text completion (greedy)
    equal the single-process server's; SIGTERM to torchrun ends every rank."""
    import openai

    from gptoss import load_model
    from gptoss.server import Engine, create_app
    from tests.conftest import running_server

    def ask(url: str) -> tuple[str, str]:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        chat = client.chat.completions.create(model="split", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=24, temperature=0)
        stream = client.completions.create(model="split", prompt="Once upon a time", max_tokens=24, temperature=0,
                                           stream=True)
        return str(chat.choices[0].message), "".join(c.choices[0].text for c in stream if c.choices)

    with running_server(create_app(Engine(load_model(checkpoint, dtype=torch.float32), max_batch=2, context=256),
                                   "split")) as url:
        want = ask(url)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "gptoss.cli.main", "serve", "--model", str(checkpoint), "--dtype", "fp32",
                               "--port", str(port), "--max-batch", "2", "--max-context", "256", "--served-model-name",
                               "split", "--store-path", str(checkpoint.parent / "store.sqlite3")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=os.environ | {"OMP_NUM_THREADS": "1", "GPTOSS_DIST_TIMEOUT": "20"})
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None and time.monotonic() < deadline, server.communicate()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.3)
        assert ask(f"http://127.0.0.1:{port}") == want
    finally:  # torchrun ends its workers on SIGTERM (and reports that it was signalled): all of them, promptly
        stopped_at = time.monotonic()
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=60)
    assert time.monotonic() - stopped_at < 45


if __name__ == "__main__":  # one rank of test_split_model_equals_single_process
    from gptoss.cli.options import load_for_ranks

    model = load_for_ranks(sys.argv[1], dtype=torch.float32)   # rank 0 returns; the others follow, then exit
    torch.save(worker_outputs(model), sys.argv[2])
