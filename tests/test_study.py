"""`gptoss study`: a tiny smoke run through the CLI, the equal budgets, reproducibility, the text."""

import argparse
import json

import pytest

from gptoss.analysis import study
from gptoss.analysis.study import Settings, StudyError, active_params, default_variants
from gptoss.cli import study as study_cli
from gptoss.errors import GptossError


def test_default_variants_have_equal_active_budgets():
    variants = default_variants()
    budget = active_params(variants[0].config)
    for v in variants:
        print(f"{v.name}: {active_params(v.config):,} active ({active_params(v.config) / budget - 1:+.2%})")
        assert active_params(v.config) == pytest.approx(budget, rel=0.01)
    shapes = {v.name: v.config for v in variants}
    assert shapes["narrow-deep"].num_layers == 4 * shapes["wide-shallow"].num_layers
    assert shapes["many-small-experts"].intermediate_size < shapes["baseline"].intermediate_size / 3
    assert shapes["window-5:1"].layer_types.count("full_attention") == 1


def test_smoke_run_through_the_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    study_cli.register(parser.add_subparsers())
    args = parser.parse_args(["study", "--out", str(tmp_path), "--variants", "baseline,no-sinks", "--steps", "10",
                              "--batch-size", "4", "--seq-len", "32", "--eval-every", "5", "--eval-windows", "8",
                              "--lr", "1e-2"])
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert table == (tmp_path / "results.md").read_text() and "| no-sinks |" in table
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["name"] for r in results["variants"]] == ["baseline", "no-sinks"]
    for r in results["variants"]:
        assert r["tokens_seen"] == 10 * 4 * 32
        assert r["curve"]["eval_step"] == [0, 5, 10]
        initial_val, *_, final_val = r["curve"]["eval_val_loss"]
        assert initial_val == pytest.approx(5.545, abs=0.1)  # about ln(256): untrained, all bytes alike
        assert final_val == r["final_val_loss"] < initial_val - 1
        assert r["final_train_loss"] < r["curve"]["eval_train_loss"][0] - 1
    assert results["text"]["val_bytes"] > 10_000


def test_same_seed_same_losses():
    splits = study.Splits.of(study.load_text(), 0.1, 16)
    settings = Settings(steps=3, batch_size=2, seq_len=16, eval_every=3, eval_windows=2)
    runs = [study.train(default_variants()[0], splits, settings, log=lambda _: None) for _ in range(2)]
    assert runs[0]["curve"] == runs[1]["curve"]


def test_errors_are_one_line(tmp_path):
    with pytest.raises(StudyError, match="unknown variant nonesuch"):
        study.select(default_variants(), ["baseline", "nonesuch"])
    with pytest.raises(StudyError, match="steps must be at least 1"):
        Settings(steps=0)
    with pytest.raises(GptossError, match="--text .*No such file"):
        study.load_text(tmp_path / "missing.txt")
    with pytest.raises(StudyError, match="too short"):
        study.Splits.of(b"tiny text", 0.1, 32)
