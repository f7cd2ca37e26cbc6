"""The arithmetic behind `gptoss compare`, and its table, JSON and plot.

Everything here is a pure function of an `Architecture` (and a context length): parameter counts
by part, KV-cache bytes, FLOPs and weight bytes per decoded token. `report` gathers them into one
JSON-ready dict that both `render` (the markdown table) and `--json` print, so the two cannot
disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from gptoss.analysis.architectures import Architecture
from gptoss.model.config import SLIDING

PARTS = ("embedding", "attention", "router", "mlp", "norms", "unembedding")
KV_DTYPE_BYTES = 2  # K and V cached in bf16


@dataclass(frozen=True)
class Params:
    """Parameter counts by part (keys: PARTS).

    total: every stored parameter; the unembedding is 0 when it is the embedding table (tied).
    active: what one token's forward pass multiplies with: attention, router, the routed experts
    plus any shared expert (or the dense MLP), norms and the whole unembedding matrix, tied or not.
    The embedding is 0 there: a token reads one row of it, not a matmul. This is the convention of
    OpenAI's gpt-oss model card (3.61B / 5.13B active); Qwen's cards add the embedding table
    (Qwen3-30B-A3B's "3.3B activated" is 3.04B active + 0.31B embedding here).
    """
    total: dict[str, int]
    active: dict[str, int]

    @property
    def total_count(self) -> int:
        return sum(self.total.values())

    @property
    def active_count(self) -> int:
        return sum(self.active.values())


def _gated_mlp(hidden: int, intermediate: int, bias: bool) -> int:
    """Gate, up and down matrices (GPT-OSS fuses gate and up into one 2I-wide matrix: same count)."""
    return 3 * hidden * intermediate + (2 * intermediate + hidden if bias else 0)


def params(arch: Architecture) -> Params:
    """Parameter counts by part, with every bias, sink and norm vector the models really hold, so
    the totals equal the released checkpoints' exactly (the tests check against transformers)."""
    h, q, kv = arch.hidden_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    attention = 2 * h * q + 2 * h * kv  # q and o, k and v projections
    if arch.attention_bias:
        attention += q + 2 * kv + h
    if arch.attention_sinks:
        attention += arch.num_heads
    if arch.qk_norm:
        attention += 2 * arch.head_dim
    router = arch.num_experts * (h + 1 if arch.router_bias else h)
    mlp_unit = _gated_mlp(h, arch.intermediate_size, arch.expert_bias)
    shared = _gated_mlp(h, arch.shared_expert_intermediate, arch.expert_bias) if arch.shared_expert_intermediate else 0
    if arch.is_moe:
        mlp_total, mlp_active = arch.num_experts * mlp_unit + shared, arch.experts_per_token * mlp_unit + shared
    else:
        mlp_total = mlp_active = mlp_unit
    table = arch.vocab_size * h
    layers = arch.num_layers
    total = {
        "embedding": table,
        "attention": layers * attention,
        "router": layers * router,
        "mlp": layers * mlp_total,
        "norms": layers * arch.norms_per_layer * h + h,  # + the final norm
        "unembedding": 0 if arch.tie_embeddings else table,
    }
    active = {**total, "embedding": 0, "mlp": layers * mlp_active, "unembedding": table}
    return Params(total, active)


# ---- KV cache and attention span ------------------------------------------------------------------

def kv_bytes_per_position(arch: Architecture) -> int:
    """Bytes one cached position costs in one layer: K and V, kv_heads x head_dim each."""
    return 2 * arch.num_kv_heads * arch.head_dim * KV_DTYPE_BYTES


def _visible_positions(arch: Architecture, context: int) -> int:
    """Positions all layers together see (and cache) for a token with `context` tokens behind it,
    itself included: a sliding layer stops at its window, a full layer sees them all."""
    return sum(min(context, arch.sliding_window) if t == SLIDING else context for t in arch.layer_types)


def windowed_kv_bytes(arch: Architecture, context: int) -> int:
    """The textbook KV cache of one sequence of `context` tokens: sliding layers keep exactly their window
    (what a model needs at least; `gptoss.generation.cache.allocated_kv_bytes` is what gptoss allocates,
    the window plus a prefill chunk)."""
    return kv_bytes_per_position(arch) * _visible_positions(arch, context)


def flops_per_token(arch: Architecture, context: int) -> dict[str, int]:
    """FLOPs to decode one token at position `context` (the token itself included), by part.

    Counted: 2 FLOPs (a multiply and an add) per active weight of the attention projections,
    router, MLP and unembedding (the few bias, sink and QK-norm weights ride along: <0.1%), and per
    layer QK^T plus attention-weights x V: 2 x 2 x heads x head_dim per visible key. Not counted:
    norms, RoPE, softmax and activation functions, which are O(hidden) rather than O(hidden^2).
    """
    active = params(arch).active
    scores = 2 * 2 * arch.num_heads * arch.head_dim * _visible_positions(arch, context)
    return {
        "attention": 2 * active["attention"] + scores,
        "mlp": 2 * (active["router"] + active["mlp"]),
        "unembedding": 2 * active["unembedding"],
    }


# ---- Weight formats ------------------------------------------------------------------------------

@dataclass(frozen=True)
class WeightFormat:
    name: str
    expert_bits: float  # bits per weight of the routed and shared experts (MoE models only)
    other_bits: float   # bits per weight of everything else but the norms, which stay bf16


# MXFP4: 32 FP4 (e2m1) values share one 8-bit E8M0 scale, (32 x 4 + 8) / 32 = 4.25 bits a weight;
# how GPT-OSS ships its experts. int8 blocks: 32 int8 values and one 8-bit scale, 8.5 bits.
WEIGHT_FORMATS = (
    WeightFormat("bf16", 16, 16),
    WeightFormat("MXFP4 experts + bf16", 4.25, 16),
    WeightFormat("MXFP4 experts + int8", 4.25, 8.5),
)


def weight_bytes(arch: Architecture, fmt: WeightFormat, per_token: bool) -> int:
    """Weight bytes: all that is stored, or (per_token) what decoding one token reads.

    A decoded token reads its active parameters (the k routed experts, not all of them), one row
    of the embedding and the whole unembedding. A dense model's MLP is not an expert, so it takes
    `other_bits`. Expert biases take the expert format too (they are <0.1% of the experts).
    """
    p = params(arch)
    counts = {**p.active, "embedding": arch.hidden_size} if per_token else p.total
    bits = {part: fmt.other_bits for part in PARTS}
    bits["norms"] = 16
    if arch.is_moe:
        bits["mlp"] = fmt.expert_bits
    return round(sum(counts[part] * bits[part] for part in PARTS) / 8)


# ---- Report, table, plot -------------------------------------------------------------------------

def report(archs: list[Architecture], contexts: list[int]) -> dict:
    """Every figure for every model, as plain JSON-ready data (context lengths as string keys)."""
    models = []
    for arch in archs:
        p = params(arch)
        shape = asdict(arch)
        del shape["layer_types"]
        shape.update(sliding_layers=arch.num_sliding, full_layers=arch.num_full,
                     attention_pattern=arch.attention_pattern())
        flops = {str(c): flops_per_token(arch, c) for c in contexts}
        for by_part in flops.values():
            by_part["total"] = sum(by_part.values())
        models.append({
            "name": arch.name,
            "architecture": shape,
            "params": {"total": p.total_count, "active": p.active_count,
                       "total_by_part": p.total, "active_by_part": p.active},
            "kv_cache_bytes": {
                "per_token_all_layers": kv_bytes_per_position(arch) * arch.num_layers,
                "per_token_full_layers": kv_bytes_per_position(arch) * arch.num_full,
                "at_context": {str(c): windowed_kv_bytes(arch, c) for c in contexts},
            },
            "flops_per_token": flops,
            "weight_bytes_read_per_token": {f.name: weight_bytes(arch, f, per_token=True) for f in WEIGHT_FORMATS},
            "weight_bytes_stored": {f.name: weight_bytes(arch, f, per_token=False) for f in WEIGHT_FORMATS},
        })
    return {"contexts": list(contexts), "kv_dtype": "bf16", "models": models}


def _count(n: float) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _bytes(n: float) -> str:
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.2f} {unit}"
    return f"{n} B"


Row = tuple[str, Callable[[dict], object]]  # a row label, and the cell it shows for one model's report


def _sections(rep: dict) -> list[tuple[str, list[Row]]]:
    """The table: sections of rows, each row reading one model's entry of the report."""
    def shape(key: str) -> Callable[[dict], object]:
        return lambda m: m["architecture"][key]

    def part(which: str, name: str) -> Callable[[dict], str]:
        return lambda m: _count(m["params"][which][name])

    def gflops(context: int, name: str) -> Callable[[dict], str]:
        return lambda m: f"{m['flops_per_token'][str(context)][name] / 1e9:.2f}"

    def experts(s: dict) -> str:
        return f"{s['num_experts']} / {s['experts_per_token']}" if s["num_experts"] else "dense"

    def pattern(s: dict) -> str:
        return s["attention_pattern"] + (f", window {s['sliding_window']}" if s["sliding_layers"] else "")

    def extras(s: dict) -> str:
        flags = {"bias": s["attention_bias"], "sinks": s["attention_sinks"], "QK-norm": s["qk_norm"],
                 "sandwich norms": s["norms_per_layer"] == 4}
        return ", ".join(label for label, on in flags.items() if on) or "-"

    contexts = rep["contexts"]
    return [
        ("Shape", [
            ("width (hidden size)", shape("hidden_size")),
            ("depth (layers)", shape("num_layers")),
            ("query / KV heads", lambda m: f"{m['architecture']['num_heads']} / {m['architecture']['num_kv_heads']}"),
            ("head dim", shape("head_dim")),
            ("experts: total / active", lambda m: experts(m["architecture"])),
            ("expert size (MLP width if dense)", shape("intermediate_size")),
            ("shared expert", lambda m: "yes" if m["architecture"]["shared_expert_intermediate"] else "no"),
            ("sliding : full attention", lambda m: pattern(m["architecture"])),
            ("layers sliding / full",
             lambda m: f"{m['architecture']['sliding_layers']} / {m['architecture']['full_layers']}"),
            ("extras", lambda m: extras(m["architecture"])),
            ("embeddings", lambda m: "tied" if m["architecture"]["tie_embeddings"] else "untied"),
            ("vocabulary", lambda m: f"{m['architecture']['vocab_size']:,}"),
        ]),
        ("Parameters (active: per token, embedding lookup not counted)", [
            ("total", lambda m: _count(m["params"]["total"])),
            ("active", lambda m: _count(m["params"]["active"])),
            ("embedding", part("total_by_part", "embedding")),
            ("attention", part("total_by_part", "attention")),
            ("router", part("total_by_part", "router")),
            ("MLP / experts, total", part("total_by_part", "mlp")),
            ("MLP / experts, active", part("active_by_part", "mlp")),
            ("norms", part("total_by_part", "norms")),
            ("unembedding (0 if tied)", part("total_by_part", "unembedding")),
        ]),
        (f"KV cache of one sequence ({rep['kv_dtype']} K and V)", [
            ("per token, all layers", lambda m: _bytes(m["kv_cache_bytes"]["per_token_all_layers"])),
            ("per token past the window (full layers)",
             lambda m: _bytes(m["kv_cache_bytes"]["per_token_full_layers"])),
            *[(f"at {c:,} tokens", lambda m, c=c: _bytes(m["kv_cache_bytes"]["at_context"][str(c)]))
              for c in contexts],
        ]),
        ("GFLOPs per decoded token", [
            *[(f"attention at {c:,}", gflops(c, "attention")) for c in contexts],
            ("MLP (router + experts)", gflops(contexts[0], "mlp")),
            ("unembedding", gflops(contexts[0], "unembedding")),
            *[(f"total at {c:,}", gflops(c, "total")) for c in contexts],
        ]),
        ("Weight bytes", [
            *[(f"read per token, {f.name}", lambda m, f=f: _bytes(m["weight_bytes_read_per_token"][f.name]))
              for f in WEIGHT_FORMATS],
            *[(f"stored, {f.name}", lambda m, f=f: _bytes(m["weight_bytes_stored"][f.name]))
              for f in WEIGHT_FORMATS],
        ]),
    ]


def _table_line(cells: list[str], widths: list[int]) -> str:
    """One markdown table row, the label left-aligned and the numbers right-aligned."""
    padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
    return "| " + " | ".join(padded) + " |"


def render(rep: dict) -> str:
    """The report as markdown tables, one per section, padded so they also read as plain text."""
    names = [m["name"] for m in rep["models"]]
    out = []
    for title, rows in _sections(rep):
        table = [[title, *names]] + [[label, *(str(cell(m)) for m in rep["models"])] for label, cell in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        rule = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
        out += [_table_line(table[0], widths), rule, *(_table_line(row, widths) for row in table[1:]), ""]
    return "\n".join(out)


PLOT_PARTS = {"attention": "attention", "router": "router", "mlp": "MLP / experts",
              "unembedding": "unembedding"}  # norms are too thin to see


def plot(archs: list[Architecture], contexts: list[int], path: str | Path) -> None:
    """Two panels: KV-cache GiB against context, and active parameters stacked by part.

    The KV axes are both logarithmic, so full attention is a straight line of slope 1 and a
    sliding window shows as a bend where it fills. Uses matplotlib's object API without pyplot,
    so no GUI backend or global state is touched.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 5.5), layout="constrained")
    kv_ax, bar_ax = fig.subplots(1, 2, width_ratios=(1.1, 1))
    top = max(max(contexts), 131072)
    xs = sorted({2 ** k for k in range(6, top.bit_length())} | set(contexts) | {top})
    for arch in archs:
        window = f", window {arch.sliding_window}" if arch.num_sliding else ""
        kv_ax.plot(xs, [windowed_kv_bytes(arch, x) / 2 ** 30 for x in xs], marker=".",
                   label=f"{arch.name} ({arch.attention_pattern()}{window})")
    for c in contexts:
        kv_ax.axvline(c, color="grey", lw=0.6, ls=":")
    kv_ax.set_xscale("log", base=2)
    kv_ax.set_yscale("log")
    kv_ax.set_xticks(xs, [f"{x // 1024}K" if x >= 1024 else str(x) for x in xs], fontsize=8)
    kv_ax.set(xlabel="context (tokens)", ylabel="GiB", title="KV cache of one sequence (bf16 K and V)")
    kv_ax.grid(alpha=0.3, which="both")
    kv_ax.legend(fontsize=8)

    all_params = [params(a) for a in archs]
    names = [a.name for a in archs]
    bottoms = [0.0] * len(archs)
    for part, label in PLOT_PARTS.items():
        heights = [p.active[part] / 1e9 for p in all_params]
        bar_ax.bar(names, heights, bottom=bottoms, label=label)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    for i, p in enumerate(all_params):
        bar_ax.annotate(f"{_count(p.active_count)} of {_count(p.total_count)}", (i, bottoms[i]),
                        ha="center", va="bottom", fontsize=8)
    bar_ax.set(ylabel="billions of parameters",
               title="Active parameters per token, of the total (embedding lookup not counted)")
    bar_ax.tick_params(axis="x", labelsize=8)
    bar_ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
