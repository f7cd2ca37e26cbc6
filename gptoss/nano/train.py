"""`gptoss train-nano`: trains the nano model, a tiny GPT-OSS, on the synthetic tasks (`gptoss.nano.tasks`)
and writes it as a Hugging Face-layout checkpoint with MXFP4 experts.

The model is `Transformer` itself, with the real architecture at a small scale (`NANO`): attention sinks
and biases, sliding-window layers alternating with full ones, top-2 of 8 experts with the clamped SwiGLU,
the o200k_harmony vocabulary of 201,088 tokens.

Most of that vocabulary never occurs in the data, and a full softmax over it on every token would cost
more than the rest of the model. So training runs on a compact vocabulary, the tokens the data uses, and
the rows of every other token stay zero in both the embedding and the unembedding (GPT-OSS's lm_head has no
bias): at inference their logits are exactly 0. The training loss adds one logit log(V - used) standing for
all of them (the logsumexp of that many zeros), which makes it the exact full-vocabulary cross-entropy.
The checkpoint then holds the full-size tensors with those zero rows, which compress to nothing.

Loss: on the tokens the assistant writes in conversations, and on every token of the prose windows.
The experts train dense in fp32; the last `qat_fraction` of the steps sees them through MXFP4 (straight-
through gradients), so that the quantized checkpoint is the model that was trained.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from gptoss.analysis.study import init_weights, load_text
from gptoss.chat.tokenizer import get_tokenizer
from gptoss.errors import GptossError
from gptoss.model.config import ModelConfig, alternating_layer_types
from gptoss.model.generation_config import FILE as GENERATION_CONFIG, GenerationConfig
from gptoss.model.transformer import Transformer
from gptoss.nano import tasks
from gptoss.quant import mxfp4
from gptoss.weights.layout import HF, checkpoint_plan
from gptoss.weights.random_checkpoint import write_safetensors

# GPT-OSS at a scale two CPU cores train in under an hour. Plain RoPE (no YaRN): the conversations are
# a few hundred tokens long. The window is 64 rather than 128, in proportion.
NANO = ModelConfig(
    name="gptoss-nano", hidden_size=192, num_layers=4, num_heads=6, num_kv_heads=2, head_dim=32,
    num_experts=8, experts_per_token=2, intermediate_size=192, sliding_window=64,
    layer_types=alternating_layer_types(4), rope_theta=10000.0, rope_scaling_factor=1.0, max_context=2048,
)
PAD = 199999  # <|endoftext|>, never trained on


@dataclass(frozen=True)
class Settings:
    steps: int = 1250
    batch_size: int = 32
    prose_fraction: float = 0.15   # of each batch's rows: windows of the prose
    prose_len: int = 128
    lr: float = 3e-3
    warmup_steps: int = 100
    qat_fraction: float = 0.1      # the last steps train through MXFP4 experts
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 2:
            raise GptossError(f"train-nano needs steps >= 1 and a batch of >= 2, got {self.steps} and "
                              f"{self.batch_size}")

    def lr_at(self, step: int) -> float:
        """Linear warmup, then cosine decay to a tenth of the peak."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ---- Data ---------------------------------------------------------------------------------------

@dataclass
class Data:
    conversations: list[tasks.Conversation]
    prose: list[int]            # the training part of the prose, as tokens
    vocabulary: torch.Tensor    # [used] the token ids the data uses, sorted; compact id = position here

    @classmethod
    def make(cls, settings: Settings, log: Callable[[str], None]) -> "Data":
        rng = random.Random(settings.seed)
        count = settings.steps * (settings.batch_size - prose_rows(settings))
        started = time.perf_counter()
        conversations = [tasks.conversation(rng) for _ in range(count)]
        text = load_text().decode()
        prose = get_tokenizer().encode(text[:int(len(text) * 0.9)], disallowed_special=())  # the rest held out
        # Every number token below 2000 joins the vocabulary, so that a held-out question's operands are known.
        numbers = {t for n in range(2000) for t in get_tokenizer().encode(str(n))}
        used = set(prose) | numbers | {PAD} | {t for c in conversations for t in c.tokens}
        log(f"{count:,} conversations ({time.perf_counter() - started:.0f} s), {len(prose):,} prose tokens, "
            f"{len(used):,} distinct tokens")
        return cls(conversations, prose, torch.tensor(sorted(used)))


def prose_rows(settings: Settings) -> int:
    return max(1, round(settings.batch_size * settings.prose_fraction))


def batch(data: Data, compact: torch.Tensor, settings: Settings, step: int, rng: random.Random):
    """The rows of one step as compact ids [B, T] and the trained-token mask of their targets [B, T]."""
    per_step = settings.batch_size - prose_rows(settings)
    rows = [(c.tokens, c.trained) for c in data.conversations[step * per_step:(step + 1) * per_step]]
    for _ in range(prose_rows(settings)):
        start = rng.randrange(len(data.prose) - settings.prose_len - 1)
        window = data.prose[start:start + settings.prose_len + 1]
        rows.append((window, [True] * len(window)))
    length = max(len(tokens) for tokens, _ in rows)
    ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    trained = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, (tokens, mask) in enumerate(rows):
        ids[i, :len(tokens)] = torch.tensor(tokens)
        trained[i, :len(mask)] = torch.tensor(mask)
    # Position t predicts token t + 1, trained when that token is.
    return compact[ids[:, :-1]], compact[ids[:, 1:]], trained[:, 1:]


# ---- Loss ---------------------------------------------------------------------------------------

def full_vocabulary_loss(logits: torch.Tensor, targets: torch.Tensor, unused: int) -> torch.Tensor:
    """Cross-entropy over the full vocabulary from the logits of the used tokens [N, used]: the `unused`
    tokens' logits are 0, and together they weigh as one logit log(unused)."""
    rest = torch.full((logits.shape[0], 1), math.log(unused), dtype=logits.dtype)
    return F.cross_entropy(torch.cat((logits, rest), dim=-1), targets)


class FakeMXFP4(nn.Module):
    """A parametrization: the weight as MXFP4 rounds it, with straight-through gradients."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        rounded = mxfp4.dequantize(*mxfp4.quantize(weight.detach()), dtype=weight.dtype)
        return weight + (rounded - weight).detach()


def quantization_aware(model: Transformer) -> None:
    for block in model.model.layers:
        for name in ("gate_up_proj", "down_proj"):
            parametrize.register_parametrization(block.mlp.experts, name, FakeMXFP4())


# ---- Training -----------------------------------------------------------------------------------

def train(settings: Settings, out: str | Path, log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Trains the nano model and writes out/{config.json, generation_config.json, model.safetensors,
    training.json}; returns what training.json holds (the loss curve included)."""
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)  # an unwritable folder fails now, not after an hour
    data = Data.make(settings, log)
    vocab = NANO.vocab_size
    compact = torch.zeros(vocab, dtype=torch.long)
    compact[data.vocabulary] = torch.arange(len(data.vocabulary))
    unused = vocab - len(data.vocabulary)

    torch.manual_seed(settings.seed)
    model = Transformer(replace(NANO, vocab_size=len(data.vocabulary))).train()
    init_weights(model)
    # The model's forward ends in the unembedding; with an identity there it returns the final hidden
    # states, and only those of trained tokens are unembedded (under half of them: prompts are not trained).
    unembed, model.lm_head = model.lm_head, nn.Identity()
    optimizer = torch.optim.AdamW([*model.parameters(), *unembed.parameters()], lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.01)
    rng = random.Random(settings.seed + 1)
    qat_from = round(settings.steps * (1 - settings.qat_fraction))
    curve, started = {"step": [], "loss": []}, time.perf_counter()
    bar = tqdm(range(settings.steps), desc="train-nano", disable=not progress, mininterval=5)
    for step in bar:
        if step == qat_from and settings.qat_fraction > 0:
            quantization_aware(model)
        for group in optimizer.param_groups:
            group["lr"] = settings.lr_at(step)
        inputs, targets, trained = batch(data, compact, settings, step, rng)
        loss = full_vocabulary_loss(unembed(model(inputs)[trained]), targets[trained], unused)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], settings.grad_clip)
        optimizer.step()
        curve["step"].append(step + 1)
        curve["loss"].append(round(loss.item(), 4))
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    seconds = time.perf_counter() - started
    log(f"trained {settings.steps} steps in {seconds / 60:.1f} min, final loss {curve['loss'][-1]:.3f}")

    if settings.qat_fraction > 0 and qat_from < settings.steps:
        for block in model.model.layers:  # keep the trained dense weights, rounded by export as they were in training
            for name in ("gate_up_proj", "down_proj"):
                parametrize.remove_parametrizations(block.mlp.experts, name, leave_parametrized=False)
    model.lm_head = unembed
    write_checkpoint(model, data.vocabulary, out)
    record = {"settings": asdict(settings), "config": asdict(NANO),
              "used_tokens": len(data.vocabulary), "conversations": len(data.conversations),
              "train_seconds": round(seconds), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "curve": curve}
    (out / "training.json").write_text(json.dumps(record) + "\n")
    return record


def write_checkpoint(model: Transformer, vocabulary: torch.Tensor, out: Path) -> None:
    """The compact model as a full-vocabulary Hugging Face checkpoint: dense weights bf16, experts MXFP4,
    the embedding and unembedding rows of unused tokens zero."""
    ours = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().float()
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            full = torch.zeros(NANO.vocab_size, NANO.hidden_size)
            full[vocabulary] = tensor
            tensor = full
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = mxfp4.quantize(tensor)
            ours[name + "_blocks"], ours[name + "_scales"] = blocks, scales
        else:
            ours[name] = tensor if name.endswith("norm.weight") else tensor.to(torch.bfloat16)
    entries = []
    for stored in checkpoint_plan(NANO, HF, quantized_experts=True):
        tensor = stored.from_ours([ours[name] for name in stored.ours])
        entries.append((stored.name, tensor.dtype, tuple(tensor.shape), lambda t=tensor: t))
    write_safetensors(out / "model.safetensors", entries)
    (out / "config.json").write_text(json.dumps(NANO.to_hf_config(quantized=True), indent=2) + "\n")
    # Greedy by default: the nano model's answers are exact or wrong, and sampling only adds mistakes.
    generation = replace(GenerationConfig.published(NANO), do_sample=False).to_json()
    (out / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")


def plot_curve(record: dict, path: str | Path) -> None:
    """The training loss against steps (EMA-smoothed), with the start of quantization-aware training marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    smoothed, ema = [], None
    for loss in record["curve"]["loss"]:
        ema = loss if ema is None else 0.95 * ema + 0.05 * loss
        smoothed.append(ema)
    ax.plot(record["curve"]["step"], record["curve"]["loss"], lw=0.5, alpha=0.4, label="each batch")
    ax.plot(record["curve"]["step"], smoothed, lw=1.5, label="EMA 0.95")
    s = record["settings"]
    if s["qat_fraction"] > 0:
        ax.axvline(round(s["steps"] * (1 - s["qat_fraction"])), color="grey", ls="--", label="MXFP4 experts from here")
    ax.set(xlabel="step", ylabel="loss (nats per trained token)", yscale="log",
           title=f"train-nano: {s['steps']} steps x {s['batch_size']} rows, {record['train_seconds'] / 60:.0f} min "
                 f"on {record['threads']} threads")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110)
