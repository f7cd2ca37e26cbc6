"""Both layouts, random checkpoints of the real geometry, and the catalogue of bad checkpoints."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptoss import CheckpointError, load_model, open_checkpoint, preset
from gptoss.cli.main import main as cli
from gptoss.weights.layout import checkpoint_tensor_specs
from tests.conftest import tiny_config


def test_hf_and_original_layouts_give_identical_logits(tmp_checkpoint):
    cfg = tiny_config(num_layers=3)
    hf, original = tmp_checkpoint(cfg, "hf", seed=7), tmp_checkpoint(cfg, "original", seed=7)
    assert open_checkpoint(hf).layout == "hf" and open_checkpoint(original).layout == "original"
    ids = torch.randint(0, cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_model(hf, dtype=torch.float32)(ids), load_model(original, dtype=torch.float32)(ids))


def test_repo_root_with_original_subfolder_is_found(tmp_checkpoint, tmp_path):
    original = tmp_checkpoint(tiny_config(), "original")
    root = tmp_path / "download"
    shutil.copytree(original, root / "original")
    assert open_checkpoint(root).layout == "original"


def test_real_geometry_tensor_plan():
    """The gpt-oss-20b names, shapes and dtypes as published (459 tensors, experts in MXFP4)."""
    specs = checkpoint_tensor_specs(preset("gpt-oss-20b"), "hf", quantized_experts=True)
    assert len(specs) == 3 + 24 * 19
    assert specs["model.layers.23.mlp.experts.gate_up_proj_blocks"].shape == (32, 5760, 90, 16)
    assert specs["model.layers.0.mlp.experts.down_proj_scales"].shape == (32, 2880, 90)
    assert specs["model.layers.0.self_attn.q_proj.weight"].shape == (4096, 2880)
    assert specs["model.layers.0.self_attn.k_proj.weight"].shape == (512, 2880)
    assert specs["lm_head.weight"].shape == (201088, 2880)
    original = checkpoint_tensor_specs(preset("gpt-oss-120b"), "original", quantized_experts=True)
    assert original["block.35.attn.qkv.weight"].shape == (5120, 2880)
    assert original["block.0.mlp.mlp1_weight.blocks"].shape == (128, 5760, 90, 16)


def test_sharded_checkpoint_with_index(tmp_checkpoint):
    cfg = tiny_config(num_layers=2)
    sharded = tmp_checkpoint(cfg, "hf", seed=1, name="sharded", shard_bytes=200_000)
    single = tmp_checkpoint(cfg, "hf", seed=1, name="single")
    assert len(list(sharded.glob("*.safetensors"))) > 1 and (sharded / "model.safetensors.index.json").exists()
    ids = torch.arange(12).view(1, 12)
    with torch.no_grad():
        assert torch.equal(load_model(sharded)(ids), load_model(single)(ids))


def test_make_checkpoint_and_inspect_commands(tmp_path, capsys):
    out = tmp_path / "ck"
    assert cli(["make-checkpoint", "--preset", "small", "--layers", "3", "--layout", "original", "--out", str(out)]) == 0
    assert cli(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "original layout" in printed and "experts MXFP4" in printed
    assert "3 layers, hidden 256, 8 query / 2 KV heads x 32, 8 experts top-4, vocab 201088, window 32" in printed


# ---- bad input: one line naming the file and tensor, before any forward pass --------------------


@pytest.fixture
def good(tmp_checkpoint):
    return tmp_checkpoint(tiny_config(num_layers=2), "hf")


def rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def expect_error(path, *fragments):
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_tensor(good):
    rewrite(good, lambda t: t.pop("model.layers.1.self_attn.sinks"))
    expect_error(good, "missing tensor 'model.layers.1.self_attn.sinks'")


def test_unexpected_tensor(good):
    rewrite(good, lambda t: t.update({"model.layers.0.extra": torch.zeros(3)}))
    expect_error(good, "model.safetensors", "unexpected tensor 'model.layers.0.extra'")


def test_wrong_shape(good):
    rewrite(good, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(7)}))
    expect_error(good, "model.safetensors", "'model.layers.0.self_attn.q_proj.bias' has shape [7]",
                 "config.json implies [64]")


def test_wrong_dtype(good):
    def to_float(t):
        t["model.layers.0.mlp.experts.down_proj_scales"] = t["model.layers.0.mlp.experts.down_proj_scales"].float()
    rewrite(good, to_float)
    expect_error(good, "'model.layers.0.mlp.experts.down_proj_scales' has dtype F32, expected U8")


def test_truncated_file(good):
    data = (good / "model.safetensors").read_bytes()
    (good / "model.safetensors").write_bytes(data[: len(data) // 2])
    expect_error(good, "model.safetensors", "truncated or corrupt")


def test_corrupt_file(good):
    (good / "model.safetensors").write_bytes(b"\x00\x01garbage" * 100)
    expect_error(good, "model.safetensors", "truncated or corrupt")


def test_config_contradicts_tensors(good):
    config = json.loads((good / "config.json").read_text())
    config["num_hidden_layers"] = 4
    config.pop("layer_types")
    (good / "config.json").write_text(json.dumps(config))
    expect_error(good, "missing tensor 'model.layers.2.", "config.json says 4 layers but the tensors hold 2")
    config["num_hidden_layers"], config["hidden_size"] = 2, 128
    (good / "config.json").write_text(json.dumps(config))
    expect_error(good, "has shape", "config.json implies")


def test_quantization_config_contradicts_dense_experts(tmp_path):
    from tests.conftest import random_hf_model

    cfg = tiny_config(num_layers=2)
    random_hf_model(cfg).save_pretrained(tmp_path / "dense")
    load_model(tmp_path / "dense")  # dense experts, no quantization_config: fine
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (tmp_path / "dense" / "config.json").write_text(json.dumps(config))
    expect_error(tmp_path / "dense", "quantization_config says the experts are MXFP4")


def test_no_known_layout(good):
    rewrite(good, lambda t: t.update({"foo": t.pop("model.embed_tokens.weight")}))
    expect_error(good, "no known layout")


def test_not_a_checkpoint(tmp_path):
    expect_error(tmp_path / "nowhere", "not a directory")
    expect_error(tmp_path, "no config.json")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    expect_error(tmp_path, "neither a Hugging Face gpt_oss config nor an OpenAI original/ config")
    (tmp_path / "config.json").write_text("{not json")
    expect_error(tmp_path, "cannot read config")


def test_missing_shard(tmp_checkpoint):
    sharded = tmp_checkpoint(tiny_config(num_layers=2), "hf", name="sharded", shard_bytes=200_000)
    sorted(sharded.glob("*.safetensors"))[-1].unlink()
    expect_error(sharded, "which is missing")


def test_cli_reports_one_line(good, capsys):
    rewrite(good, lambda t: t.pop("lm_head.weight"))
    assert cli(["inspect", str(good)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gptoss: error:") and "'lm_head.weight'" in err and "\n" not in err


def test_dense_options_and_f16(tmp_checkpoint):
    """dequantize_experts gives dense experts with the same logits; an fp16 load runs the reference path."""
    path = tmp_checkpoint(tiny_config(num_layers=2), "hf", seed=4)
    packed, dense = load_model(path, dtype=torch.float32), load_model(path, dtype=torch.float32, dequantize_experts=True)
    assert dense.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32
    ids = torch.arange(10).view(1, 10)
    with torch.no_grad():
        assert torch.allclose(packed(ids), dense(ids), atol=1e-5)
        half = load_model(path, dtype=torch.float16)(ids)
    assert half.isfinite().all()


def test_make_checkpoint_refuses_bad_output_and_layers(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.safetensors").write_bytes(b"x")
    assert cli(["make-checkpoint", "--preset", "tiny", "--out", str(tmp_path / "full")]) == 2
    assert cli(["make-checkpoint", "--preset", "tiny", "--layers", "0", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--layers must be at least 1" in err
