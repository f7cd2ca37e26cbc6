"""The nano model: its synthetic tasks, its training command, and the shipped checkpoint answering through
the tokenizer, the MXFP4 loader, the KV cache and the harmony parser."""

import json
import math
import random

import torch
import torch.nn.functional as F

from gptoss.chat.harmony import Chat, StreamParser, render_for_completion, stop_tokens
from gptoss.chat.tokenizer import get_tokenizer
from gptoss.cli.main import main as cli
from gptoss.nano import tasks
from gptoss.nano.train import full_vocabulary_loss

# A held-out question (training never saw it) and its answer, for the shipped model.
QUESTION, ANSWER = "What is 48 + 55?", "103"


def test_conversations_are_seeded_and_train_only_on_what_the_assistant_writes():
    first = [tasks.conversation(random.Random(7)) for _ in range(3)]
    again = [tasks.conversation(random.Random(7)) for _ in range(3)]
    assert [c.tokens for c in first] == [c.tokens for c in again]
    tokenizer = get_tokenizer()
    for c in (tasks.arithmetic(random.Random(1), "+", 3, False), tasks.weather(random.Random(2), False),
              tasks.json_answer(random.Random(3), False)):
        prompt = render_for_completion(c.chat)  # what chat and serve send: the start of the training tokens
        assert c.tokens[:len(prompt)] == prompt and not any(c.trained[:len(prompt)])
        assert tokenizer.decode(c.tokens[-1:]) == "<|return|>" and c.trained[-1]
    weather = tasks.weather(random.Random(2), False)
    text = tokenizer.decode([t for t, trained in zip(weather.tokens, weather.trained) if trained])
    assert f'{{"city": "{weather.expected["city"]}"}}<|call|>' in text  # the call, trained on
    assert "temperature_c" not in text                                 # the tool's answer, not trained on


def test_the_reasoning_works_digit_by_digit():
    reasoning, answer = tasks.arithmetic_reasoning(347, "+", 588)
    assert answer == 935
    assert reasoning == ("347 is 3 4 7. 588 is 5 8 8. 7+8=15, write 5 carry 1. 4+8+1=13, write 3 carry 1. "
                         "3+5+1=9, write 9 carry 0. Digits: 9 3 5. Answer 935.")
    assert tasks.arithmetic_reasoning(52, "-", 87)[1] == -35
    assert tasks.arithmetic_reasoning(47, "*", 38)[1] == 47 * 38
    # Each digit of the working is a token of its own (o200k would read "347" as one).
    pieces = [get_tokenizer().decode([t]) for t in get_tokenizer().encode("4+8+1=13, write 3 carry 1.")]
    assert pieces[:6] == ["4", "+", "8", "+", "1", "="]


def test_training_never_draws_a_held_out_conversation():
    rng = random.Random(0)
    training = [tasks.conversation(rng) for _ in range(400)]
    held = [tasks.conversation(rng, held_out=True) for _ in range(40)]
    assert not any(tasks.is_held_out(c.key) for c in training)
    assert all(tasks.is_held_out(c.key) for c in held)
    assert {c.task.split()[0] for c in held} >= {"weather", "json", "2-digit"}


def test_the_loss_over_used_tokens_is_the_full_vocabulary_loss():
    used, vocab = 50, 1000
    logits = torch.randn(6, used)
    targets = torch.randint(0, used, (6,))
    full = torch.cat((logits, torch.zeros(6, vocab - used)), dim=-1)  # unused rows: logits exactly 0
    assert torch.allclose(full_vocabulary_loss(logits, targets, vocab - used), F.cross_entropy(full, targets))


def test_train_nano_writes_a_loadable_checkpoint(tmp_path):
    from gptoss import load_model

    out = tmp_path / "nano"
    assert cli(["train-nano", "--out", str(out), "--steps", "2", "--batch-size", "3"]) == 0
    assert {"config.json", "generation_config.json", "model.safetensors", "training.json", "loss.png"} <= {
        p.name for p in out.iterdir()}
    model = load_model(out)
    assert model.model.layers[0].mlp.experts.quantized  # MXFP4 experts
    embedding = model.model.embed_tokens.weight
    assert embedding.shape[0] == 201088 and embedding[150_000].abs().sum() == 0  # a token the data never uses
    record = json.loads((out / "training.json").read_text())
    assert len(record["curve"]["loss"]) == 2 and all(math.isfinite(x) for x in record["curve"]["loss"])
    assert cli(["train-nano", "--out", str(out), "--steps", "0"]) == 2


def test_the_shipped_model_answers_through_tokenizer_loader_cache_and_parser():
    from gptoss import load_model
    from gptoss.generation.cache import KVCache
    from gptoss.generation.generate import stream
    from gptoss.weights.hub import resolve_model

    model = load_model(resolve_model(None))  # the default model: MXFP4 experts, bf16 dense weights
    assert model.model.layers[0].mlp.experts.quantized
    cache = KVCache.for_tokens(model.config, 512, dtype=model.dtype)
    parser = StreamParser()
    for token in stream(model, render_for_completion(Chat().user(QUESTION)), 200, stop_tokens=stop_tokens(),
                        cache=cache):
        parser.feed(token)
    messages = parser.finish()
    assert [m.channel for m in messages] == ["analysis", "final"]
    assert messages[-1].text == ANSWER


def test_chat_answers_one_prompt_on_the_default_model(capsys):
    assert cli(["chat", "--prompt", QUESTION]) == 0
    out = capsys.readouterr().out
    assert out.startswith(ANSWER) and "/reset" not in out


def test_random_small_stays_available(tmp_path, monkeypatch):
    from gptoss.weights.hub import resolve_model

    monkeypatch.setenv("GPTOSS_HOME", str(tmp_path))
    assert resolve_model("random-small") == tmp_path / "random-small"
    assert (tmp_path / "random-small" / "config.json").exists()
