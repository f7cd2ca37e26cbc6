"""`gptoss study`: the design notes' choices, each tried on a tiny model trained on the CPU.

The notes contrast GPT-OSS with Qwen3 and Gemma 3: wider rather than deeper, few large rather than
many small experts, sliding-window attention 1:1 rather than 5:1 (or not at all), attention sinks,
attention bias. Here each choice is one change to a GPT-OSS-shaped baseline, built through the same
`ModelConfig` fields and `Transformer` that run the real models, and every variant gets the same
budget: equal active parameters per token (`fit_budget` sizes the experts to reach it), the same
text, the same batches in the same order, the same steps. What differs in the losses is then the
architecture, plus the noise of one initialisation, which the repeated baseline measures.

Byte-level: the vocabulary is the 256 byte values, so no tokenizer is needed and the embedding is too
small to dominate the budget. The text is Python's own documentation (see `load_text`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from gptoss.analysis.architectures import Architecture
from gptoss.analysis.compare import params
from gptoss.errors import GptossError
from gptoss.model.config import ModelConfig, sliding_pattern
from gptoss.model.transformer import Transformer

TEXT_SOURCE = ("pydoc_data.topics: the Python Language Reference and library topics that help() shows, "
               "shipped with CPython's standard library")


class StudyError(GptossError):
    """A missing text, an unknown variant or a setting the study cannot run with."""


# ---- Variants -----------------------------------------------------------------------------------

# GPT-OSS in miniature: 1:1 sliding window, sinks, attention bias, few large experts (8, top-2, each
# as wide as the residual stream), GQA 2, pre-norm; plain RoPE since the sequences are short.
BASELINE = ModelConfig(
    name="baseline", vocab_size=256, hidden_size=96, num_layers=6, num_heads=6, num_kv_heads=3, head_dim=16,
    num_experts=8, experts_per_token=2, intermediate_size=96, sliding_window=32, layer_types=sliding_pattern(6, 1),
    rope_theta=10000.0, rope_scaling_factor=1.0, max_context=1024, eos_token_ids=(), pad_token_id=0,
)


@dataclass(frozen=True)
class Variant:
    name: str
    change: str          # what differs from the baseline, in the design notes' words
    config: ModelConfig
    init_seed: int = 0   # added to the run's seed for the initial weights only


def active_params(cfg: ModelConfig) -> int:
    return params(Architecture.from_model_config(cfg)).active_count


def total_params(cfg: ModelConfig) -> int:
    return params(Architecture.from_model_config(cfg)).total_count


def fit_budget(cfg: ModelConfig, budget: int) -> ModelConfig:
    """`cfg` with the expert width that brings its active parameters nearest to `budget`.

    Active parameters grow linearly with intermediate_size, so two counts give the line.
    """
    at_1, at_2 = (active_params(replace(cfg, intermediate_size=i)) for i in (1, 2))
    width = round(1 + (budget - at_1) / (at_2 - at_1))
    if width < 1:
        raise StudyError(f"{cfg.name}: attention alone exceeds the budget of {budget:,} active parameters")
    return replace(cfg, intermediate_size=width)


def default_variants(base: ModelConfig = BASELINE) -> list[Variant]:
    """One change per variant. Shape changes get their experts re-sized to the baseline's active
    parameters; the ablations (window, sinks, bias) change nothing else, so their budgets differ by
    the few parameters they remove."""
    budget = active_params(base)

    def reshaped(name: str, **fields) -> ModelConfig:
        return fit_budget(replace(base, name=name, **fields), budget)

    def ablated(name: str, **fields) -> ModelConfig:
        return replace(base, name=name, **fields)

    L = base.num_layers
    return [
        Variant("baseline", "GPT-OSS-shaped: 1:1 window, sinks, bias, few large experts", base),
        Variant("baseline-reinit", "the baseline from other initial weights: the noise floor", base, init_seed=1),
        Variant("wide-shallow", "half the layers, wider", reshaped(
            "wide-shallow", num_layers=L // 2, hidden_size=128, num_heads=8, num_kv_heads=4,
            layer_types=sliding_pattern(L // 2, 1))),
        Variant("narrow-deep", "twice the layers, narrower", reshaped(
            "narrow-deep", num_layers=2 * L, hidden_size=64, num_heads=4, num_kv_heads=2,
            layer_types=sliding_pattern(2 * L, 1))),
        Variant("many-small-experts", "4x the experts, 4x the top-k, each ~1/4 as wide (Qwen3's way)", reshaped(
            "many-small-experts", num_experts=4 * base.num_experts, experts_per_token=4 * base.experts_per_token)),
        Variant("window-5:1", "5 sliding layers per full one (Gemma 3's pattern)",
                ablated("window-5:1", layer_types=sliding_pattern(L, 5))),
        Variant("no-window", "full attention on every layer (Qwen3's)",
                ablated("no-window", layer_types=sliding_pattern(L, 0))),
        Variant("no-sinks", "no attention sinks", ablated("no-sinks", attention_sinks=False)),
        Variant("no-attn-bias", "no q/k/v/o biases", ablated("no-attn-bias", attention_bias=False)),
    ]


def select(variants: list[Variant], names: list[str] | None) -> list[Variant]:
    if not names:
        return variants
    by_name = {v.name: v for v in variants}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise StudyError(f"unknown variant {', '.join(unknown)}; known: {', '.join(by_name)}")
    return [by_name[n] for n in names]


# ---- Text ---------------------------------------------------------------------------------------

def load_text(path: str | Path | None = None) -> bytes:
    """The training text as bytes: `path`, or by default Python's pydoc_data topics.

    pydoc_data ships with CPython itself (about 0.45 MB of English prose, with code samples, in
    Python 3.11), so the study needs nothing installed beyond Python; its content changes a little
    between Python versions, which is why results record the text's size and hash.
    """
    if path is not None:
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise StudyError(f"--text {path}: {e.strerror}") from None
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise StudyError("the default text, Python's pydoc_data.topics, is missing from this Python: install its full "
                         "standard library (Debian: apt-get install libpython3-stdlib) or pass --text FILE") from None
    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


@dataclass
class Splits:
    train: torch.Tensor   # [N] uint8 bytes
    val: torch.Tensor

    @classmethod
    def of(cls, text: bytes, val_fraction: float, seq_len: int) -> Splits:
        """The last `val_fraction` of the text held out, as nanoGPT does for Shakespeare."""
        data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        n_val = int(len(data) * val_fraction)
        if n_val < seq_len + 1 or len(data) - n_val < seq_len + 1:
            raise StudyError(f"a text of {len(data):,} bytes is too short for sequences of {seq_len}")
        return cls(train=data[:-n_val], val=data[-n_val:])


def windows(data: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets [len(starts), seq_len] (int64) from the windows at `starts`."""
    rows = torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()]).long()
    return rows[:, :-1], rows[:, 1:]


def eval_starts(data: torch.Tensor, count: int, seq_len: int) -> torch.Tensor:
    """`count` window starts spread evenly over `data`: the same for every variant and every eval."""
    return torch.linspace(0, len(data) - seq_len - 1, count).long()


# ---- Training -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    steps: int = 150
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 25
    eval_windows: int = 64      # train and validation windows scored at each eval
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_windows"):
            if getattr(self, name) < 1:
                raise StudyError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.seq_len > BASELINE.max_context:
            raise StudyError(f"seq_len {self.seq_len} exceeds the variants' context of {BASELINE.max_context}")

    def lr_at(self, step: int) -> float:
        """Linear warmup over the first `warmup_fraction` of the steps, then cosine decay to a tenth of the peak."""
        warmup = max(1, round(self.warmup_fraction * self.steps))
        if step < warmup:
            return self.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, self.steps - warmup)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def init_weights(model: Transformer) -> None:
    """GPT-2's scheme: N(0, 0.02), the projections that write into the residual stream divided by
    sqrt(2 x layers) so that depth does not grow the stream; biases and sinks 0, norm scales 1.
    (The model's own init is for loading: experts start at zero.)"""
    residual_std = 0.02 / math.sqrt(2 * model.config.num_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("bias", "sinks")):
                p.zero_()
            else:
                p.normal_(0, residual_std if name.endswith(("o_proj.weight", "down_proj")) else 0.02)


def loss_of(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)                                       # [B, T, 256]
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate(model: Transformer, data: torch.Tensor, starts: torch.Tensor, settings: Settings) -> float:
    model.eval()
    losses = [loss_of(model, *windows(data, chunk, settings.seq_len)).item()
              for chunk in starts.split(settings.batch_size)]
    model.train()
    return sum(losses) / len(losses)


def train(variant: Variant, splits: Splits, settings: Settings, log: Callable[[str], None] = print) -> dict:
    """Trains one variant; returns its row of the results, loss curves included."""
    cfg = variant.config
    torch.manual_seed(settings.seed + variant.init_seed)
    model = Transformer(cfg)
    init_weights(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)
    batches = torch.Generator().manual_seed(settings.seed)       # the same batches for every variant
    train_eval = eval_starts(splits.train, settings.eval_windows, settings.seq_len)
    val_eval = eval_starts(splits.val, settings.eval_windows, settings.seq_len)
    curve = {"step": [], "train_loss": [], "eval_step": [], "eval_train_loss": [], "eval_val_loss": []}

    def record_eval(step: int) -> None:
        curve["eval_step"].append(step)
        curve["eval_train_loss"].append(evaluate(model, splits.train, train_eval, settings))
        curve["eval_val_loss"].append(evaluate(model, splits.val, val_eval, settings))

    record_eval(0)
    seconds = cpu_seconds = 0.0  # wall and process CPU time of the steps: the machine may be shared
    for step in range(settings.steps):
        started, cpu_started = time.perf_counter(), time.process_time()
        starts = torch.randint(0, len(splits.train) - settings.seq_len - 1, (settings.batch_size,), generator=batches)
        for group in optimizer.param_groups:
            group["lr"] = settings.lr_at(step)
        loss = loss_of(model, *windows(splits.train, starts, settings.seq_len))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        seconds += time.perf_counter() - started
        cpu_seconds += time.process_time() - cpu_started
        curve["step"].append(step + 1)
        curve["train_loss"].append(loss.item())
        if (step + 1) % settings.eval_every == 0 or step + 1 == settings.steps:
            record_eval(step + 1)
            log(f"{variant.name}: step {step + 1}/{settings.steps}  train {curve['eval_train_loss'][-1]:.3f}  "
                f"val {curve['eval_val_loss'][-1]:.3f}  ({seconds:.0f} s)")
    return {
        "name": variant.name,
        "change": variant.change,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("eos_token_ids", "pad_token_id")},
        "attention_pattern": Architecture.from_model_config(cfg).attention_pattern(),
        "active_params": active_params(cfg),
        "total_params": total_params(cfg),
        "tokens_seen": settings.steps * settings.batch_size * settings.seq_len,
        "train_seconds": round(seconds, 1),
        "train_cpu_seconds": round(cpu_seconds, 1),
        "final_train_loss": curve["eval_train_loss"][-1],
        "final_val_loss": curve["eval_val_loss"][-1],
        "curve": curve,
    }


def run(variants: list[Variant], text: bytes, settings: Settings, out: str | Path,
        log: Callable[[str], None] = print, source: str = TEXT_SOURCE) -> dict:
    """Trains every variant and writes out/results.json, out/results.md and out/loss_curves.png.

    `source` says where `text` came from, for results.json. The output folder is made first, so an
    unwritable one fails before minutes of training rather than after."""
    Path(out).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    splits = Splits.of(text, settings.val_fraction, settings.seq_len)
    log(f"text: {len(text):,} bytes ({len(splits.train):,} train, {len(splits.val):,} validation); "
        f"{len(variants)} variants x {settings.steps} steps x {settings.batch_size} x {settings.seq_len} bytes")
    results = {
        "text": {"source": source, "bytes": len(text), "sha256": hashlib.sha256(text).hexdigest(),
                 "train_bytes": len(splits.train), "val_bytes": len(splits.val)},
        "settings": asdict(settings),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "variants": [train(v, splits, settings, log) for v in variants],
    }
    results["wall_seconds"] = round(time.perf_counter() - started, 1)  # evaluations included
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(render(results))
    plot(results, out / "loss_curves.png")
    return results


# ---- Table and plot -----------------------------------------------------------------------------

def _k(n: int) -> str:
    return f"{n / 1e3:.0f}K" if n < 1e6 else f"{n / 1e6:.2f}M"


def render(results: dict) -> str:
    """The results as one markdown table (losses in nats per byte)."""
    head = ["variant", "layers x width", "experts (top-k x width)", "attention", "active", "total",
            "tokens", "train loss", "val loss", "wall s", "CPU s"]
    rows = []
    for r in results["variants"]:
        c = r["config"]
        extras = [name for name, on in (("sinks", c["attention_sinks"]), ("bias", c["attention_bias"])) if on]
        window = f", window {c['sliding_window']}" if r["attention_pattern"] != "full only" else ""
        rows.append([r["name"], f"{c['num_layers']} x {c['hidden_size']}",
                     f"{c['num_experts']} ({c['experts_per_token']} x {c['intermediate_size']})",
                     f"{r['attention_pattern']}{window}; {', '.join(extras) or 'no sinks, no bias'}",
                     _k(r["active_params"]), _k(r["total_params"]), _k(r["tokens_seen"]),
                     f"{r['final_train_loss']:.3f}", f"{r['final_val_loss']:.3f}", f"{r['train_seconds']:.0f}",
                     f"{r['train_cpu_seconds']:.0f}"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 4 else "---:" for i in range(len(head))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def plot(results: dict, path: str | Path) -> None:
    """Three panels: training loss (smoothed) and validation loss against steps, one line per variant,
    and the final validation losses beside the spread of the baseline's two initialisations.

    Uses matplotlib's object API without pyplot, so no GUI backend or global state is touched.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(17, 5), layout="constrained")
    train_ax, val_ax, final_ax = fig.subplots(1, 3, width_ratios=(1, 1, 0.8))
    variants = results["variants"]
    for r in variants:
        curve, smoothed, ema = r["curve"], [], None
        for loss in curve["train_loss"]:  # exponential moving average: single batches are noisy
            ema = loss if ema is None else 0.9 * ema + 0.1 * loss
            smoothed.append(ema)
        style = dict(ls="--" if r["name"].startswith("baseline") else "-", lw=1.2)
        train_ax.plot(curve["step"], smoothed, label=r["name"], **style)
        # Step 0 is ln(256) for every variant: leaving it out lets the axis show the differences.
        val_ax.plot(curve["eval_step"][1:], curve["eval_val_loss"][1:], marker=".", label=r["name"], **style)
    s = results["settings"]
    train_ax.set(xlabel="step", ylabel="loss (nats per byte)", title="training loss (EMA 0.9 of each batch)",
                 ylim=(None, math.log(256) + 0.1))
    val_ax.set(xlabel="step", ylabel="loss (nats per byte)",
               title=f"validation loss ({s['eval_windows']} held-out windows of {s['seq_len']} bytes)")
    val_ax.legend(fontsize=8)

    names = [r["name"] for r in variants]
    finals = [r["final_val_loss"] for r in variants]
    final_ax.barh(names, finals, color=[f"C{i}" for i in range(len(variants))])
    seeds = [r["final_val_loss"] for r in variants if r["name"].startswith("baseline")]
    if len(seeds) > 1:
        final_ax.axvspan(min(seeds), max(seeds), color="grey", alpha=0.3, label="baseline, two initialisations")
        final_ax.legend(fontsize=8, loc="lower right")
    final_ax.set_xlim(min(finals) - 0.1, max(finals) + 0.05)
    final_ax.invert_yaxis()
    final_ax.set(xlabel="loss (nats per byte)", title=f"final validation loss (step {s['steps']})")
    for ax in (train_ax, val_ax, final_ax):
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
