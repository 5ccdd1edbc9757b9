"""
The reversible encoder-decoder Reformer (encdec.py) against a plain torch.nn.Transformer
encoder-decoder of the same size, trained for the same wall-clock time in the same run on a real
parallel corpus, then all scored with sacreBLEU on its held-out test part (beam search, the
same decoding code for all). Three rows: ours (reversible), ours with reversible=False, and
nn.Transformer.

    apt-get install trans-de-en        # or: apt-get download trans-de-en && dpkg-deb -x ... ding
    python -m translation.translation_data --dataset=ding --data_dir=data   # data/ding_en_de.tsv
    OMP_NUM_THREADS=1 python -m translation.compare_translation --data_path=data/ding_en_de.tsv \
        --budget_s=600

Fair time. The models take turns: each iteration trains whichever has used least of its budget,
so a busy moment on a shared machine slows all alike, and each stops after budget_s seconds of
its own training steps (evaluation is not counted). Same data, batches (batch k at step k),
tokenizer, optimizer (Adam 0.9/0.98, linear warmup then rsqrt decay, as the authors' configs),
label smoothing, dropout, tied embeddings, sizes and initialisation (--init). The baseline is
nn.Transformer(norm_first=True, activation='gelu'): pre-LayerNorm like ours. The results file
(--out, experiments/results/translation.json) holds each model's training curve with both the
step and the seconds of every point, the losses at equal steps and at equal time, the scores,
and BLEU against minutes: each model's weights are copied at every budget_s / --curve_points of
its training seconds and scored after training, on the first --curve_sentences test sentences
(their outputs are kept). `python -m experiments.report` writes translation/README.md's table
from it.

Why ours learned less per step (docs/translation_gap.md): one factor at a time, each run trained
for the same number of steps on the same batches, its curve saved as it finishes (resumable):

    OMP_NUM_THREADS=1 python -m translation.compare_translation --gap --steps=500 ...
    python -m translation.compare_translation --gap --table \
        --plot=experiments/results/translation_gap.png          # the Markdown table, the curves

Shape legend: B batch, S source length, T target length, C d_model, V vocab_size.
"""
import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from collections import namedtuple
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import ReformerLM, logits_and_loss, positional_embedding
from translation.encdec import EncDecConfig, ReformerEncDec, token_scale
from translation.encdec import attention_in_projections as encdec_attention_in_projections
from translation.translate import evaluate, sacrebleu_scores
from translation.translation_data import (ParallelStream, write_text, build_tokenizer, collate,
                                          encode_splits, length_batches, load_parallel)


class TorchTransformerMT(nn.Module):
    """torch.nn.Transformer with our embeddings, output layer and loss, and the interface
    encdec.beam_search needs (encode, start_cache, step, reorder_cache). Its step reruns the
    decoder over the whole prefix: nn.Transformer has no key/value cache. Initialised as ours
    except the attention input projections, which keep nn.MultiheadAttention's xavier init and
    Q/K/V biases (initialise() makes the two models' inits equal)."""

    def __init__(self, config):
        super().__init__()
        self.config = cfg = config
        self.emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = positional_embedding(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        with warnings.catch_warnings():   # "nested tensors off with norm_first": as intended
            warnings.simplefilter("ignore", UserWarning)
            self.transformer = nn.Transformer(
                cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.n_dec_layers, cfg.d_ff,
                cfg.dropout, activation="gelu", batch_first=True, norm_first=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(ReformerLM._init_weights)
        self.lm_head.weight = self.emb.weight

    def _embed(self, idx):
        x = token_scale(self.config) * self.emb(idx) + self.pos_emb(idx.shape[1])
        return self.drop(x)                                                # (B, T, C)

    def encode(self, src):
        mask = src != 0
        return self.transformer.encoder(self._embed(src), src_key_padding_mask=~mask), mask

    def decode(self, tgt_in, memory, memory_mask):
        T = tgt_in.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=tgt_in.device).triu(1)
        return self.transformer.decoder(self._embed(tgt_in), memory, tgt_mask=causal,
                                        memory_key_padding_mask=~memory_mask)  # (B, T, C)

    def forward(self, src, tgt_in, targets=None):
        memory, mask = self.encode(src)
        return logits_and_loss(self.decode(tgt_in, memory, mask), self.lm_head, targets, 1,
                               self.config.label_smoothing)

    def start_cache(self, memory, memory_mask, max_len, repeat=1):
        return {"memory": memory.repeat_interleave(repeat, 0),
                "mask": memory_mask.repeat_interleave(repeat, 0),
                "tokens": memory.new_zeros((memory.shape[0] * repeat, 0), dtype=torch.long)}

    def step(self, token, t, cache):
        cache["tokens"] = torch.cat([cache["tokens"], token[:, None]], dim=1)
        h = self.decode(cache["tokens"], cache["memory"], cache["mask"])[:, -1]
        return self.lm_head(h)                                             # (B, V)

    @staticmethod
    def reorder_cache(cache, rows, n):
        """Row i becomes row rows[i] (encdec.ReformerEncDec.reorder_cache); n is not needed."""
        for name in ("tokens", "memory", "mask"):
            cache[name] = cache[name][rows]

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


# -----------------------------------------------------------------------------------------------
# One initialisation for both models
# -----------------------------------------------------------------------------------------------

INITS = ("ours", "xavier_attn", "each_own")


def attention_in_projections(model):
    """The weight matrices that make queries, keys and values, in either model: ours's
    (encdec.attention_in_projections) and nn.MultiheadAttention's in_proj_weight (3C, C)."""
    yield from encdec_attention_in_projections(model)
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            yield m.in_proj_weight


def initialise(model, init):
    """Draw model's weights by the scheme `init` names (--init):

        ours         N(0, 0.02) for every weight matrix, embeddings included; biases 0
        xavier_attn  the same, except the attention input projections: U(-a, a) with
                     a = sqrt(6 / (C + 3C)), nn.MultiheadAttention's xavier init of its packed
                     (3C, C) in_proj_weight (std sqrt(1 / 2C): 0.063 at C = 128)
        each_own     each model as built: ours by its config's attn_init (xavier by default),
                     nn.Transformer's in_proj_weight xavier, its other layers PyTorch's defaults

    Q/K/V biases (nn.MultiheadAttention's in_proj_bias; ours has none) start at 0 in all three."""
    if init not in INITS:
        raise ValueError(f"init={init!r} is not one of {INITS}")
    if init == "each_own":
        return model
    model.apply(ReformerLM._init_weights)
    C = model.config.d_model
    a = math.sqrt(6 / (C + 3 * C))
    for w in attention_in_projections(model):
        with torch.no_grad():
            if init == "ours":
                w.normal_(0.0, 0.02)
            else:
                w.uniform_(-a, a)
    return model


def drop_qkv_biases(model):
    """Fix nn.MultiheadAttention's Q/K/V biases at 0 (they start there; now they stay there, as
    ours have none). Adam skips a parameter without a gradient."""
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            nn.init.zeros_(m.in_proj_bias)
            m.in_proj_bias.requires_grad_(False)
    return model


def build_model(kind, cfg, init, seed, qkv_bias=True):
    """'ours' (ReformerEncDec) or 'transformer' (TorchTransformerMT), initialised by `init`."""
    torch.manual_seed(seed)
    model = ReformerEncDec(cfg) if kind == "ours" else TorchTransformerMT(cfg)
    initialise(model, init)
    return model if qkv_bias else drop_qkv_biases(model)


# -----------------------------------------------------------------------------------------------
# Training and held-out loss
# -----------------------------------------------------------------------------------------------

def lr_at(step, peak, warmup):
    """Linear warmup to peak, then decay with 1 / sqrt(step) (Vaswani et al.; trax's rsqrt)."""
    step = max(step, 1)
    return peak * min(step / warmup, (warmup / step) ** 0.5)


@torch.no_grad()
def heldout_loss(model, examples, max_tokens):
    """Per target token over a held-out split, in eval mode: the NLL (unsmoothed; exp of it is
    the perplexity) and the label-smoothed loss that training minimises."""
    model.eval()
    nll = smoothed = count = 0.0
    for batch in length_batches(examples, max_tokens):
        src, tgt_in, targets = collate([examples[i] for i in batch])
        logits, t = model(src, tgt_in)[0].flatten(0, 1), targets.flatten()  # (B T, V), (B T,)
        n = int((t != -100).sum())
        nll += float(F.cross_entropy(logits, t, ignore_index=-100)) * n
        smoothed += float(F.cross_entropy(logits, t, ignore_index=-100,
                                          label_smoothing=model.config.label_smoothing)) * n
        count += n
    model.train()
    return {"valid_nll": nll / count, "valid_ppl": math.exp(nll / count),
            "valid_loss": smoothed / count}


def train_side_by_side(models, data, a, max_steps=None, snapshots=None, snapshot_at=()):
    """Train every model for a.budget_s seconds of its own steps (or max_steps steps), taking
    turns. Returns (steps, seconds used, logs): a log point every a.log_interval steps holds the
    step, the training seconds so far and the mean training loss over those steps. With a dict
    `snapshots`, snapshots[k] collects (step, seconds, weights) of model k each time its training
    seconds pass one of `snapshot_at` (copies on the CPU; scored after training, untimed)."""
    opts = {k: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=a.lr,
                                betas=(0.9, 0.98), eps=1e-9) for k, m in models.items()}
    streams = {k: ParallelStream(data, a.max_seq_len, seed=a.seed) for k in models}  # same batches
    used = {k: 0.0 for k in models}
    steps = {k: 0 for k in models}
    log = {k: [] for k in models}
    recent = {k: [] for k in models}
    while True:
        live = [k for k in models if used[k] < a.budget_s
                and (max_steps is None or steps[k] < max_steps)]
        if not live:
            return steps, used, log
        k = min(live, key=lambda name: used[name])
        model, opt = models[k], opts[k]
        t0 = time.perf_counter()
        src, tgt_in, targets = streams[k].batch(a.max_tokens)
        for group in opt.param_groups:
            group["lr"] = lr_at(steps[k] + 1, a.lr, a.warmup)
        loss = model(src, tgt_in, targets)[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        used[k] += time.perf_counter() - t0
        steps[k] += 1
        recent[k].append(loss.item())
        if snapshots is not None:
            taken = snapshots.setdefault(k, [])
            if len(taken) < len(snapshot_at) and used[k] >= snapshot_at[len(taken)]:
                taken.append((steps[k], used[k], {n: t.detach().clone()
                                                  for n, t in model.state_dict().items()}))
        if steps[k] % a.log_interval == 0:
            mean = sum(recent[k]) / len(recent[k])
            log[k].append({"step": steps[k], "seconds": round(used[k], 2), "loss": mean})
            recent[k] = []
            if steps[k] % a.print_interval == 0:
                print(f"{k:24s} step {steps[k]:5d}  {used[k]:6.0f} s  loss {mean:.3f}",
                      flush=True)


def bleu_curve(model, tok, pairs, snapshots, a):
    """sacreBLEU and chrF of `pairs` (beam a.beam_size) at each snapshot (step, seconds, weights)
    of model; the model's own weights are put back after."""
    final = {n: t.detach().clone() for n, t in model.state_dict().items()}
    curve = []
    for step, seconds, weights in snapshots:
        model.load_state_dict(weights)
        r = evaluate(model, tok, pairs, a.beam_size, a.alpha, device="cpu")
        curve.append({"step": step, "seconds": round(seconds, 1), "bleu": r["bleu"],
                      "chrf": r["chrf"]})
    model.load_state_dict(final)
    return curve


def loss_at(log, key, x):
    """The logged mean loss at the last point whose `key` (step or seconds) is <= x, or None."""
    points = [p["loss"] for p in log if p[key] <= x]
    return points[-1] if points else None


def equal_axes(logs, n_points=10):
    """Every model's loss at the same steps and at the same training seconds: n_points evenly
    spaced up to the least any model reached. {'step': {'at': [...], model: [...]}, 'seconds':
    ...}."""
    out = {}
    for key in ("step", "seconds"):
        end = min(log[-1][key] for log in logs.values())
        at = [round(end * (i + 1) / n_points, 1 if key == "seconds" else None)
              for i in range(n_points)]
        out[key] = {"at": at, **{k: [loss_at(log, key, x) for x in at]
                                 for k, log in logs.items()}}
    return out


def machine():
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_avg": os.getloadavg()}


def write_json(path, obj):
    """Atomically: the file is complete or absent, never half written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text(path, json.dumps(obj, indent=1))


def plot_curves(logs, path, keys=("step", "seconds"), smooth=1, bleu=None):
    """The training loss of every model against each of `keys`, one panel each; each point the
    mean of `smooth` consecutive log points. With bleu ({model: bleu_curve}), a last panel:
    sacreBLEU against training minutes. Up to 20 lines get 20 distinct colours."""
    import matplotlib
    import plot
    fig, axes = plot.figure(len(keys) + (bleu is not None))
    colours = matplotlib.colormaps["tab20" if len(logs) > 10 else "tab10"].colors
    for ax, key in zip(axes, keys):
        for colour, (name, log) in zip(colours, logs.items()):
            pts = [log[i:i + smooth] for i in range(0, len(log) - smooth + 1, smooth)]
            ax.plot([p[-1][key] for p in pts], [sum(q["loss"] for q in p) / len(p) for p in pts],
                    label=name, color=colour)
        ax.set_xlabel("training seconds" if key == "seconds" else "step")
        ax.set_ylabel("training loss (label-smoothed)")
        ax.grid(alpha=0.3)
    if bleu is not None:
        ax = axes[-1]
        for colour, (name, curve) in zip(colours, bleu.items()):
            ax.plot([p["seconds"] / 60 for p in curve], [p["bleu"] for p in curve], marker="o",
                    label=name, color=colour)
        ax.set(xlabel="training minutes", ylabel="sacreBLEU (the curve's test sentences)")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    return plot.save(fig, path)


def plot_results(results, path):
    """A side-by-side results file's figure: loss by step, by seconds, and BLEU by minutes."""
    models = results["models"]
    curves = {k: r["bleu_curve"] for k, r in models.items() if "bleu_curve" in r}
    return plot_curves({k: r["log"] for k, r in models.items()}, path,
                       bleu=curves if curves else None)


def equal_table(results):
    """The Markdown tables of a side-by-side results file: every row's training loss (the mean
    of the log interval ending there) at equal steps, then at equal training seconds."""
    names = list(results["models"])
    lines = []
    for key, unit in (("step", "step"), ("seconds", "seconds")):
        eq = results["equal"][key]
        lines += ["", f"| {unit} | " + " | ".join(f"`{k}`" for k in names) + " |",
                  "|---|" + "---|" * len(names)]
        for i, x in enumerate(eq["at"]):
            cells = ["-" if eq[k][i] is None else f"{eq[k][i]:.3f}" for k in names]
            lines.append(f"| {x:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines[1:])


# -----------------------------------------------------------------------------------------------
# Why ours learns less per step: one factor at a time (--gap), each run alone for --steps steps
# -----------------------------------------------------------------------------------------------

# Each run starts from ours (not reversible, N(0, 0.02) everywhere, the config's positions) or
# from nn.Transformer as built (xavier attention input projections, Q/K/V biases) and changes one
# thing. Not-reversible ours equals nn.Transformer with the same weights and zero Q/K/V biases
# (tests/test_compare_translation.py), so what is left to differ is the init, the biases, the
# reversible layers, and (through its interaction with them) dropout. The *_reseeded runs draw
# another init and other dropout masks (seed + 1; the same batches): the noise floor, and a
# second sample of the main comparison.
GapRun = namedtuple("GapRun", "model change config init qkv_bias seed_offset", defaults=(True, 0))
GAP_RUNS = {
    "transformer": GapRun("transformer", "the reference, as built", {}, "each_own"),
    "ours_reversible": GapRun("ours", "reversible=True (the default)", {"reversible": True},
                              "ours"),
    "ours": GapRun("ours", "reversible=False", {}, "ours"),
    "ours_xavier_attn": GapRun("ours", "reversible=False, xavier attention init", {},
                               "xavier_attn"),
    "transformer_init_ours": GapRun("transformer", "N(0, 0.02) attention init", {}, "ours"),
    "transformer_no_qkv_bias": GapRun("transformer", "no Q/K/V biases", {}, "each_own", False),
    "ours_sinusoidal": GapRun("ours", "reversible=False, sinusoids, tokens x sqrt(C)",
                              {"pos_emb": "sinusoidal"}, "ours"),
    "transformer_sinusoidal": GapRun("transformer", "sinusoids, tokens x sqrt(C)",
                                     {"pos_emb": "sinusoidal"}, "each_own"),
    "ours_no_dropout": GapRun("ours", "reversible=False, dropout 0", {"dropout": 0.0}, "ours"),
    "transformer_no_dropout": GapRun("transformer", "dropout 0", {"dropout": 0.0}, "each_own"),
    "ours_reversible_xavier_attn": GapRun("ours", "reversible=True, xavier attention init",
                                          {"reversible": True}, "xavier_attn"),
    "transformer_reseeded": GapRun("transformer", "the reference, init and dropout seed + 1", {},
                                   "each_own", seed_offset=1),
    "ours_reseeded": GapRun("ours", "reversible=False, init and dropout seed + 1", {}, "ours",
                            seed_offset=1),
    "ours_xavier_attn_reseeded": GapRun("ours", "reversible=False, xavier attention init, "
                                        "init and dropout seed + 1", {}, "xavier_attn",
                                        seed_offset=1),
}


def last_mean(log, n=50):
    """Mean training loss over the last n steps of a log with a point every step."""
    return sum(p["loss"] for p in log[-n:]) / len(log[-n:])


def gap_runs(a, cfg, data):
    """Train the runs of a.runs one after another, a.steps steps each on the same batches, and
    write each into a.gap_out as it finishes; runs already there are kept (resumable)."""
    out = json.load(open(a.gap_out)) if os.path.exists(a.gap_out) else {"runs": {}}
    a.log_interval = 1                                  # a point every step: last_mean needs it
    for name in a.runs.split(","):
        if name not in GAP_RUNS:
            raise ValueError(f"--runs: {name!r} is not one of {list(GAP_RUNS)}")
        if name in out["runs"]:
            print(f"{name}: in {a.gap_out} already")
            continue
        r = GAP_RUNS[name]
        model = build_model(r.model, replace(cfg, **r.config), r.init, a.seed + r.seed_offset,
                            r.qkv_bias)
        steps, used, log = train_side_by_side({name: model}, data["train"], a, a.steps)
        run = {"model": r.model, "change": r.change, "config_change": r.config, "init": r.init,
               "qkv_bias": r.qkv_bias, "seed_offset": r.seed_offset,
               "params": model.num_params(), "steps": steps[name],
               "train_seconds": used[name], "train_loss_last50": last_mean(log[name]),
               **heldout_loss(model, data["valid"], a.max_tokens), "log": log[name]}
        out["runs"][name] = run
        out.update(command=a.command, args={k: v for k, v in vars(a).items() if k != "runs"},
                   config=cfg.__dict__, machine=machine())
        write_json(a.gap_out, out)
        print(f"{name}: train loss (last 50 steps) {run['train_loss_last50']:.3f}  valid NLL "
              f"{run['valid_nll']:.3f}  {used[name] / steps[name]:.2f} s/step", flush=True)
    return out


def window_means(log, n=50):
    """The mean training loss of each n consecutive steps of a log with a point every step."""
    return [sum(p["loss"] for p in log[i:i + n]) / n for i in range(0, len(log) - n + 1, n)]


def gap_table(results):
    """The Markdown table of a --gap results file, one row per run: its train loss (mean of the
    last 50 steps) and valid NLL, their differences from nn.Transformer's, and the worst 50-step
    window of the whole curve relative to nn.Transformer's same window."""
    runs = results["runs"]
    ref = runs.get("transformer")
    lines = ["| run | model | change | train loss, last 50 steps | valid NLL | train loss - "
             "nn.Transformer's | valid NLL - nn.Transformer's | worst 50-step window vs "
             "nn.Transformer's | s / step |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        d = "- | - | -"
        if ref:
            worst = max((w - v) / v for w, v in zip(window_means(r["log"]),
                                                    window_means(ref["log"])))
            d = (f"{r['train_loss_last50'] - ref['train_loss_last50']:+.3f} | "
                 f"{r['valid_nll'] - ref['valid_nll']:+.3f} | {100 * worst:+.1f} %")
        lines.append(f"| `{name}` | {r['model']} | {r['change']} | "
                     f"{r['train_loss_last50']:.3f} | {r['valid_nll']:.3f} | {d} | "
                     f"{r['train_seconds'] / r['steps']:.2f} |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------------------------
# The command line
# -----------------------------------------------------------------------------------------------

# The side-by-side rows: name -> (model, config changes)
ROWS = {"reformer": ("ours", {"reversible": True}),
        "reformer_not_reversible": ("ours", {"reversible": False}),
        "transformer": ("transformer", {})}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--data_path", default="data/ding_en_de.tsv", help="TSV source<TAB>target")
    p.add_argument("--data_dir", default="data", help="where the tokenizer is cached")
    p.add_argument("--budget_s", type=float, default=600, help="training seconds per model")
    p.add_argument("--heldout", type=int, default=1000, help="valid and test pairs each")
    p.add_argument("--vocab_size", type=int, default=8000, help="sentencepiece vocabulary")
    p.add_argument("--max_seq_len", type=int, default=64)
    p.add_argument("--layers", type=int, default=3, help="encoder and decoder layers each")
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--n_heads", type=int, default=4)
    p.add_argument("--d_ff", type=int, default=1024)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--pos_emb", default="absolute", help="positions of both models (model.py)")
    p.add_argument("--init", default="xavier_attn", choices=INITS, help=(
        "initialisation of both models (initialise()): xavier_attn = nn.MultiheadAttention's "
        "xavier in every attention input projection, N(0, 0.02) elsewhere: each model at its "
        "best, measured (docs/translation_gap.md); ours = N(0, 0.02) everywhere; each_own = "
        "the confounded comparison from before this flag"))
    p.add_argument("--max_tokens", type=int, default=1024,
                   help="padded tokens per batch (rounded down to a multiple of max_seq_len)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=400)
    p.add_argument("--beam_size", type=int, default=4)
    p.add_argument("--curve_points", type=int, default=4, help=(
        "BLEU-against-minutes points: weights kept at every budget_s / curve_points of training "
        "seconds, scored after training"))
    p.add_argument("--curve_sentences", type=int, default=250,
                   help="the curve's points score the first this many test sentences")
    p.add_argument("--alpha", type=float, default=0.6)
    p.add_argument("--log_interval", type=int, default=50, help="steps per curve point")
    p.add_argument("--print_interval", type=int, default=50, help="steps per printed line")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="experiments/results/translation.json")
    p.add_argument("--plot", default="", help=(
        "draw the training curves of --out (with --gap: of --gap_out) into this .png"))
    p.add_argument("--gap", action="store_true", help=(
        "instead: the runs of --runs, --steps each, into --gap_out (docs/translation_gap.md)"))
    p.add_argument("--steps", type=int, default=500, help="--gap: training steps per run")
    p.add_argument("--runs", default=",".join(GAP_RUNS), help="--gap: which runs, in order")
    p.add_argument("--gap_out", default="experiments/results/translation_gap.json")
    p.add_argument("--table", action="store_true", help=(
        "print the Markdown table of --out (with --gap: of --gap_out), draw --plot, and exit"))
    a = p.parse_args(argv)
    a.command = " ".join(["python -m translation.compare_translation"]
                         + (sys.argv[1:] if argv is None else argv))
    return a


def main(argv=None):
    a = parse_args(argv)
    if a.table:
        results = json.load(open(a.gap_out if a.gap else a.out))
        print(gap_table(results) if a.gap else equal_table(results))
        if a.plot and a.gap:       # each point the mean of 25 steps
            plot_curves({k: r["log"] for k, r in results["runs"].items()}, a.plot, ("step",), 25)
        elif a.plot:
            plot_results(results, a.plot)
        return None
    splits, name = load_parallel("parallel", a.data_dir, a.data_path, a.heldout, a.seed)
    tok = build_tokenizer("sentencepiece", splits["train"], a.data_dir, name, a.vocab_size)
    data = encode_splits(splits, tok, a.max_seq_len)
    print(f"{len(data['train']):,} training pairs, {len(data['test']):,} test; vocab "
          f"{tok.vocab_size}; {torch.get_num_threads()} threads")
    # --gap's runs start from ours not reversible (GAP_RUNS); the side-by-side rows set it each
    cfg = EncDecConfig(vocab_size=tok.vocab_size, max_seq_len=a.max_seq_len,
                       n_layers=a.layers, n_dec_layers=a.layers, d_model=a.d_model,
                       n_heads=a.n_heads, d_ff=a.d_ff, dropout=a.dropout, pos_emb=a.pos_emb,
                       reversible=not a.gap)
    if a.gap:
        return gap_runs(a, cfg, data)
    models = {k: build_model(kind, replace(cfg, **change), a.init, a.seed)
              for k, (kind, change) in ROWS.items()}
    for k, m in models.items():
        print(f"{k}: {m.num_params():,} parameters")
    t0 = time.time()
    snapshot_at = [a.budget_s * i / a.curve_points for i in range(1, a.curve_points)]
    snapshots = {}
    steps, used, log = train_side_by_side(models, data["train"], a, snapshots=snapshots,
                                          snapshot_at=snapshot_at)
    results = {"command": a.command, "args": vars(a), "config": cfg.__dict__,
               "n_train": len(data["train"]), "n_test": len(data["test"]),
               "vocab_size": tok.vocab_size, "machine": machine(), "wall_s": time.time() - t0,
               "equal": equal_axes(log), "models": {}}
    curve_pairs = splits["test"][:a.curve_sentences]
    results["curve_pairs"] = [list(pair) for pair in curve_pairs]
    for k, m in models.items():
        r = evaluate(m, tok, splits["test"], a.beam_size, a.alpha, device="cpu",
                     hypotheses=True)
        r.update(params=m.num_params(), steps=steps[k], train_seconds=used[k],
                 reversible=ROWS[k][0] == "ours" and m.config.reversible,
                 **heldout_loss(m, data["valid"], a.max_tokens), log=log[k])
        r["bleu_curve"] = bleu_curve(m, tok, curve_pairs, snapshots.get(k, []), a)
        r["curve_hypotheses"] = r.pop("hypotheses")[:len(curve_pairs)]
        last = sacrebleu_scores(r["curve_hypotheses"], [ref for _, ref in curve_pairs])
        r["bleu_curve"].append({"step": steps[k], "seconds": round(used[k], 1),
                                "bleu": last["bleu"], "chrf": last["chrf"]})
        results["models"][k] = r
        print(f"\n== {k}: {steps[k]} steps in {used[k]:.0f} s")
        print(f"sacreBLEU {r['bleu']:.2f}  chrF {r['chrf']:.2f}  valid NLL "
              f"{r['valid_nll']:.3f}  teacher-forced acc "
              f"{100 * r['teacher_forced_token_accuracy']:.1f}%  ({r['bleu_signature']})")
        print("BLEU on the first {} test sentences by training minute: {}".format(
            len(curve_pairs), ", ".join(f"{p['seconds'] / 60:.1f} min {p['bleu']:.2f}"
                                        for p in r["bleu_curve"])))
    write_json(a.out, results)
    print(equal_table(results))
    if a.plot:
        plot_results(results, a.plot)
    return results


if __name__ == "__main__":
    main()
