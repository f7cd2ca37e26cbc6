"""The `gptoss` command as a person uses it: generate, a two-turn chat in a terminal, model resolution."""

import os
import re
import subprocess
import sys

import pytest

from gptoss import GptossError, preset
from gptoss.cli.main import main as cli
from gptoss.weights.hub import resolve_model

GPTOSS = [sys.executable, "-m", "gptoss.cli.main"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from gptoss.weights.random_checkpoint import write_random_checkpoint

    return write_random_checkpoint(preset("tiny"), tmp_path_factory.mktemp("cli") / "tiny", seed=2)


def test_generate_streams_a_completion(tiny_model):
    run = subprocess.run([*GPTOSS, "generate", "--model", str(tiny_model), "--max-tokens", "12", "--threads", "1",
                          "Hello, world"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("Hello, world") and len(run.stdout) > len("Hello, world\n")
    assert re.search(r"\[\d+ tokens, [\d.]+ tok/s\]", run.stderr)


def test_chat_in_a_terminal_keeps_the_conversation_and_resets(tiny_model):
    """Drives `gptoss chat` through a pseudo-terminal: two turns, /reset, a third turn, /exit.

    The status line after each answer gives the prompt's length and how much of it was cached: the second
    prompt holds the first turn, so it is longer, and reuses the first prompt's whole pages; after /reset
    the prompt is back to the size of a first turn, all of whose whole pages are still cached."""
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(GPTOSS[0], [*GPTOSS[1:], "chat", "--model", str(tiny_model), "--max-tokens", "8",
                                      "--threads", "1"], encoding="utf-8", timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    sizes, cached = [], []
    try:
        for line in ("Hello there", "And now?", "/reset", "Hello there", "/exit"):
            child.expect_exact("> ")
            child.sendline(line)
            if line == "/reset":
                child.expect_exact("[conversation cleared]")
            elif line != "/exit":
                child.expect(r"\[prompt (\d+) tokens \((\d+) cached\), (\d+) new")
                sizes.append(int(child.match.group(1)))
                cached.append(int(child.match.group(2)))
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    first, second, after_reset = sizes
    assert second > first + 8          # the first turn (question and answer) is in the second prompt
    assert after_reset == first        # the same first turn again, from an empty conversation
    page = 32
    assert cached == [0, first // page * page, (first - 1) // page * page] and cached[1] > 0


def test_offline_hub_id_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-gptoss-test")
    assert cli(["generate", "--model", "openai/gpt-oss-20b", "hi"]) == 2
    err = capsys.readouterr().err
    assert "openai/gpt-oss-20b" in err and "cannot be downloaded" in err and "Traceback" not in err


def test_model_resolution(tiny_model, tmp_path):
    assert resolve_model(str(tiny_model)) == tiny_model
    with pytest.raises(GptossError, match="no such directory"):
        resolve_model(str(tmp_path / "missing" / "dir"))


def test_kv_cache_command(capsys):
    # 12 full layers x ctx + 12 sliding x 21 pages of 32 (the pages of 128 - 1 + 512 positions, plus one
    # for a chunk that starts inside a page), x 2048 bytes
    assert cli(["kv-cache", "--preset", "gpt-oss-20b", "--context", "4096,131072"]) == 0
    out = capsys.readouterr().out
    assert f"{(12 * 4096 + 12 * 672) * 2048:,} bytes" in out and f"{(12 * 131072 + 12 * 672) * 2048:,} bytes" in out
    assert cli(["kv-cache", "--context", "4k"]) == 2


def test_bench_json_has_the_promised_keys(tiny_model, capsys):
    import json

    assert cli(["bench", "--model", str(tiny_model), "--prompt-lens", "16,32", "--gen", "4", "--threads", "1",
                "--chunk", "16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["prefill_tok_s"]) == {"16", "32"} and all(v > 0 for v in result["prefill_tok_s"].values())
    for key in ("decode_tok_s", "decode_gb_s", "load_s", "peak_rss_gb"):
        assert result[key] > 0


def test_chat_runs_the_browser_and_the_python_tool_within_a_turn(tiny_model, tmp_path, monkeypatch, capsys):
    """`gptoss chat --browser-backend local:DIR --python-tool`: a random model calls no tool by itself, so
    the sampled tokens are forced (the model still runs, under the tools' grammar): a search, a python
    run, then an answer. Each call is run, its answer shown, and the model goes on in the same turn."""
    import torch

    from gptoss.chat.tokenizer import get_tokenizer
    from gptoss.generation import generate as generate_module
    from gptoss.tools.python_sandbox import sandbox_unavailable

    if why := sandbox_unavailable():
        pytest.skip(f"the python sandbox cannot run here: {why}")
    pages = tmp_path / "pages"
    pages.mkdir()
    (pages / "moon.md").write_text("# The Moon\n\nThe moon raises the tides.\n")
    forced = get_tokenizer().encode(
        '<|channel|>analysis to=browser.search code<|message|>{"query": "tides"}<|call|>'
        "<|channel|>analysis to=python code<|message|>print(6 * 7)<|call|>"
        "<|channel|>final<|message|>Tides follow the moon.<|return|>", allowed_special="all")
    real = generate_module.sample
    monkeypatch.setattr(generate_module, "sample", lambda logits, params, generator=None: (
        torch.tensor([forced.pop(0)]) if forced else real(logits, params, generator)))
    lines = iter(["How do tides work?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert cli(["chat", "--model", str(tiny_model), "--browser-backend", f"local:{pages}", "--python-tool",
                "--max-tokens", "300", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "[0] tides" in out and "The Moon" in out     # the search results page the model was shown
    assert "\n42\n" in out.replace("\033[0m", "\n").replace("\033[2m", "\n")  # what python printed
    assert "Tides follow the moon." in out and not forced
