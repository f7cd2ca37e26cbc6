"""`gptoss compare`: the published totals, the KV/FLOP/byte arithmetic, the config loader and the CLI."""

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gptoss.analysis.architectures import (
    BUILTIN,
    GEMMA3_27B,
    QWEN3_30B_A3B,
    QWEN3_235B_A22B,
    load_config_json,
    resolve,
)
from gptoss.analysis.compare import (
    WEIGHT_FORMATS,
    flops_per_token,
    kv_bytes_per_position,
    windowed_kv_bytes,
    params,
    render,
    report,
    weight_bytes,
)
from gptoss.cli import compare as compare_cli
from gptoss.errors import GptossError
from gptoss.model.config import PRESETS
from gptoss.weights.layout import model_tensor_specs
from tests.conftest import hf_config

B = 1e9
DOCS = Path(__file__).resolve().parent.parent / "docs" / "compare.md"


# ---- published totals -----------------------------------------------------------------------------

@pytest.mark.parametrize("name, total, active", [
    ("gpt-oss-20b", 20.91 * B, 3.61 * B),    # OpenAI's gpt-oss model card, to the two decimals it gives
    ("gpt-oss-120b", 116.83 * B, 5.13 * B),
])
def test_gpt_oss_matches_the_model_card(name, total, active):
    p = params(BUILTIN[name])
    assert p.total_count == pytest.approx(total, abs=0.005 * B)
    assert p.active_count == pytest.approx(active, abs=0.005 * B)


@pytest.mark.parametrize("name, total, non_embedding, active_with_embedding, tol", [
    # Qwen's model cards: "30.5B in total and 3.3B activated", "Non-Embedding: 29.9B";
    # "235B in total and 22B activated", "Non-Embedding: 234B". Qwen counts the embedding as activated.
    ("Qwen3-30B-A3B", 30.5 * B, 29.9 * B, 3.3 * B, 0.06 * B),  # 3.35B active + embedding, "3.3B"
    ("Qwen3-235B-A22B", 235 * B, 234 * B, 22 * B, 0.5 * B),
])
def test_qwen3_matches_its_model_cards(name, total, non_embedding, active_with_embedding, tol):
    p = params(BUILTIN[name])
    assert p.total_count == pytest.approx(total, abs=tol)
    assert p.total_count - p.total["embedding"] - p.total["unembedding"] == pytest.approx(non_embedding, abs=tol)
    assert p.active_count + p.total["embedding"] == pytest.approx(active_with_embedding, abs=tol)


def test_gemma3_text_matches_the_technical_report():
    # Gemma 3 technical report, table 1, 27B: 25,600M non-embedding parameters. Its vision encoder
    # (417M) is not counted here; its embedding figure (1,416M) is 6M above 262,208 x 5376 and not pinned.
    p = params(BUILTIN["Gemma-3-27B"])
    assert p.total_count - p.total["embedding"] == pytest.approx(25_600e6, abs=1e6)
    assert p.total_count == pytest.approx(27.0 * B, abs=0.05 * B)
    assert p.total["unembedding"] == 0 and p.active["unembedding"] == p.total["embedding"]  # tied
    assert p.active_count == p.total_count  # dense: every weight works on every token


def _hf_reference(name: str):
    """transformers' own model class for a built-in, from the same config values we read."""
    transformers = pytest.importorskip("transformers")
    if name.startswith("gpt-oss"):
        return transformers.GptOssForCausalLM, hf_config(PRESETS[name])
    if name.startswith("Qwen3"):
        raw = {"Qwen3-30B-A3B": QWEN3_30B_A3B, "Qwen3-235B-A22B": QWEN3_235B_A22B}[name]
        return transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig(
            **{k: v for k, v in raw.items() if k != "model_type"})
    text = {k: v for k, v in GEMMA3_27B["text_config"].items() if k != "model_type"}
    return transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(**text)


@pytest.mark.parametrize("name", list(BUILTIN))
def test_totals_equal_transformers_models_built_on_meta(name):
    cls, config = _hf_reference(name)
    with torch.device("meta"):
        model = cls(config)
    assert sum(p.numel() for p in model.parameters()) == params(BUILTIN[name]).total_count


@pytest.mark.parametrize("name", ["gpt-oss-20b", "gpt-oss-120b"])
def test_totals_equal_our_model_built_on_meta(name):
    from gptoss.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(PRESETS[name], quantized_experts=False)
    assert sum(p.numel() for p in model.parameters()) == params(BUILTIN[name]).total_count


def test_published_gpt_oss_counts_are_exact():
    assert params(BUILTIN["gpt-oss-20b"]).total_count == 20_914_757_184
    assert params(BUILTIN["gpt-oss-120b"]).total_count == 116_829_156_672


def test_a_shared_expert_is_stored_once_and_always_active():
    qwen = BUILTIN["Qwen3-30B-A3B"]
    with_shared = params(replace(qwen, shared_expert_intermediate=1024))
    extra = qwen.num_layers * 3 * qwen.hidden_size * 1024
    assert with_shared.total_count == params(qwen).total_count + extra
    assert with_shared.active_count == params(qwen).active_count + extra


# ---- KV cache, FLOPs, bytes -----------------------------------------------------------------------

def test_kv_cache_of_gpt_oss_20b():
    arch = BUILTIN["gpt-oss-20b"]
    assert (arch.num_sliding, arch.num_full) == (12, 12)
    assert kv_bytes_per_position(arch) == 8 * 64 * 2 * 2 == 2048  # 8 KV heads x 64 dims x (K, V) x bf16
    for context in (1, 100, 128, 129, 4096, 131072):
        assert windowed_kv_bytes(arch, context) == 12 * 2048 * context + 12 * 2048 * min(context, 128)
    assert windowed_kv_bytes(arch, 4096) == 103_809_024
    assert windowed_kv_bytes(arch, 131072) == 3_224_371_200


def test_kv_cache_of_the_other_patterns():
    gemma, qwen = BUILTIN["Gemma-3-27B"], BUILTIN["Qwen3-30B-A3B"]
    assert (gemma.num_sliding, gemma.num_full, gemma.attention_pattern()) == (52, 10, "5:1")
    assert kv_bytes_per_position(gemma) == 16 * 128 * 2 * 2
    assert windowed_kv_bytes(gemma, 131072) == 8192 * (10 * 131072 + 52 * 1024)
    assert qwen.attention_pattern() == "full only"
    assert windowed_kv_bytes(qwen, 32768) == 48 * 4 * 128 * 2 * 2 * 32768
    assert BUILTIN["gpt-oss-120b"].attention_pattern() == "1:1"


def test_flops_per_token_of_gpt_oss_20b():
    arch, context = BUILTIN["gpt-oss-20b"], 4096
    flops = flops_per_token(arch, context)
    expert = 3 * 2880 * 2880 + 2 * 2880 + 2880
    assert flops["mlp"] == 2 * 24 * (32 * 2880 + 32 + 4 * expert)
    scores = 2 * 2 * 64 * 64 * (12 * context + 12 * 128)
    assert flops["attention"] == 2 * params(arch).total["attention"] + scores
    assert flops["unembedding"] == 2 * 201088 * 2880


def test_weight_bytes_per_format():
    arch = BUILTIN["gpt-oss-20b"]
    p = params(arch)
    bf16, mxfp4_bf16, mxfp4_int8 = WEIGHT_FORMATS
    assert weight_bytes(arch, bf16, per_token=True) == 2 * (p.active_count + arch.hidden_size)  # + one embedding row
    rest = p.total_count - p.total["mlp"]
    assert weight_bytes(arch, mxfp4_bf16, per_token=False) == round(p.total["mlp"] * 4.25 / 8 + 2 * rest)
    assert weight_bytes(arch, mxfp4_int8, per_token=True) < weight_bytes(arch, mxfp4_bf16, per_token=True)
    gemma = BUILTIN["Gemma-3-27B"]  # dense: no experts to put in MXFP4
    assert weight_bytes(gemma, mxfp4_bf16, per_token=True) == weight_bytes(gemma, bf16, per_token=True)


def test_counts_and_bytes_match_the_checkpoint_layout():
    """The tensors our model and its MXFP4 checkpoints hold (gptoss.weights.layout), counted directly."""
    arch, cfg = BUILTIN["gpt-oss-20b"], PRESETS["gpt-oss-20b"]
    dense = model_tensor_specs(cfg, quantized_experts=False)
    assert sum(math.prod(s.shape) for s in dense.values()) == params(arch).total_count
    stored = sum(math.prod(s.shape) * (1 if s.kind == "uint8" else 2)  # MXFP4 blocks and scales are bytes
                 for s in model_tensor_specs(cfg, quantized_experts=True).values())
    # Only the expert biases differ: the checkpoint keeps them bf16, `weight_bytes` gives them 4.25 bits.
    assert weight_bytes(arch, WEIGHT_FORMATS[1], per_token=False) == pytest.approx(stored, rel=1e-3)


# ---- config.json loader ---------------------------------------------------------------------------

def _write(tmp_path: Path, folder: str, raw: dict) -> Path:
    (tmp_path / folder).mkdir()
    path = tmp_path / folder / "config.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize("name, raw", [
    ("gpt-oss-120b", PRESETS["gpt-oss-120b"].to_hf_config()),
    ("gpt-oss-20b", PRESETS["gpt-oss-20b"].to_original_config()),
    ("Qwen3-30B-A3B", QWEN3_30B_A3B),
    ("Gemma-3-27B", GEMMA3_27B),
])
def test_config_json_files_load_to_the_builtins(tmp_path, name, raw):
    path = _write(tmp_path, name, raw)
    assert load_config_json(path) == BUILTIN[name]
    assert resolve(str(path.parent)) == BUILTIN[name]


@pytest.mark.parametrize("raw, message", [
    ({"model_type": "llama"}, "'llama' is not one of"),
    ({**QWEN3_30B_A3B, "mlp_only_layers": [0]}, "dense layers"),
    ({k: v for k, v in QWEN3_30B_A3B.items() if k != "num_experts"}, "lacks num_experts"),
])
def test_unsupported_configs_are_one_line_errors(tmp_path, raw, message):
    with pytest.raises(GptossError, match=message):
        load_config_json(_write(tmp_path, "model", raw))


def test_builtin_names_ignore_case_and_unknown_names_fail():
    assert resolve("QWEN3-30B-A3B") is BUILTIN["Qwen3-30B-A3B"]
    with pytest.raises(GptossError, match="unknown model 'llama-3'"):
        resolve("llama-3")


# ---- CLI ------------------------------------------------------------------------------------------

def _run(capsys, *argv: str):
    parser = argparse.ArgumentParser()
    compare_cli.register(parser.add_subparsers())
    args = parser.parse_args(["compare", *argv])
    assert args.func(args) == 0
    return capsys.readouterr()


def test_default_output_is_the_table_in_the_docs(capsys):
    out = _run(capsys).out
    for needle in (*BUILTIN, "20.91B", "116.83B", "at 131,072 tokens", "MXFP4 experts + int8"):
        assert needle in out
    assert out in DOCS.read_text(), "docs/compare.md is stale: paste the new `gptoss compare` output"


def test_json_and_plot(capsys, tmp_path):
    qwen = _write(tmp_path, "my-qwen", QWEN3_30B_A3B)
    png = tmp_path / "compare.png"
    captured = _run(capsys, "--models", f"gpt-oss-20b, {qwen}", "--context", "128,4096", "--json", "--plot", str(png))
    rep = json.loads(captured.out)
    assert rep["contexts"] == [128, 4096]
    assert [m["name"] for m in rep["models"]] == ["gpt-oss-20b", "my-qwen"]
    assert rep["models"][0]["kv_cache_bytes"]["at_context"]["4096"] == 103_809_024
    assert rep == report([BUILTIN["gpt-oss-20b"], resolve(str(qwen))], [128, 4096])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["--models", "gpt-oss-20b,nonesuch"], "unknown model 'nonesuch'"),
    (["--context", "4096,0"], "--context needs positive integers"),
    (["--models", " , "], "needs at least one"),
])
def test_bad_options_are_one_line_errors(capsys, argv, message):
    with pytest.raises(GptossError, match=message):
        _run(capsys, *argv)


def test_render_is_markdown():
    text = render(report([BUILTIN["gpt-oss-20b"]], [4096]))
    tables = text.strip().split("\n\n")
    assert all(t.splitlines()[1].startswith("|---") for t in tables)
    assert all(line.startswith("| ") and line.endswith(" |") for t in tables for line in t.splitlines()[2:])
