"""
The figures of train.py (loss.png: the training and validation loss) and of bench.py (one per
sub-command: speed, memory-hashes, memory-depth, throughput), in one place with one palette.
matplotlib is imported only when a figure is drawn, with the Agg backend: no display needed.

    import plot
    plot.loss_curves(records, 'out/loss.png')           # records: the lines of log.jsonl, as dicts
    fig, (ax,) = plot.figure(); ...; plot.save(fig, 'experiments/bench_results/throughput.png')
"""

# One palette for every benchmark figure: a colour per number of hash rounds, a line style per
# implementation (ours solid), grey for the rows without hashing.
HASH_COLORS = {1: "tab:blue", 2: "tab:orange", 4: "tab:green", 8: "tab:red"}
IMPL_STYLES = {"ours": "-", "reformer-pytorch": "--", "transformers": ":"}
OURS_COLOR, PEER_COLOR = "tab:green", "tab:gray"


def figure(ncols=1):
    """A new figure of ncols side-by-side axes: (fig, [ax, ...])."""
    import matplotlib
    matplotlib.use("Agg")   # no display needed
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4), squeeze=False)
    return fig, list(axes[0])


def save(fig, path, dpi=80):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, bbox_inches="tight")   # "tight": keeps a legend placed outside
    plt.close(fig)
    return path


def loss_curves(records, path):
    """train.py's loss.png: the training loss and the validation loss against the step."""
    fig, (ax,) = figure()
    for kind, label, marker in (("train", "train", None), ("eval", "valid", "o")):
        points = [(r["step"], r["loss"]) for r in records if r["kind"] == kind]
        if points:
            ax.plot(*zip(*points), label=label, marker=marker)
    ax.set(xlabel="step", ylabel="loss (nats per token)", yscale="log")
    ax.legend()
    return save(fig, path, dpi=120)


# ----------------------------------------------------------------------------- bench.py's figures

def speed(rows, path):
    """Seconds per step against length: ours alone (paper Figure 5), and ours against the peers."""
    fig, (ax1, ax2) = figure(2)
    lines = {}
    for r in rows:
        if "seconds" in r:
            lines.setdefault((r["impl"], r["n_hashes"]), []).append((r["length"], r["seconds"]))
    for (impl, h), pts in lines.items():
        xs, ys = zip(*sorted(pts))
        base = impl.split(" (")[0]   # 'ours (compiled)' -> 'ours'
        if base in ("ours-full", "sdpa"):
            label = {"ours-full": "ours full", "sdpa": "SDPA"}[base]
            ax1.plot(xs, ys, "k-o" if base == "ours-full" else "k--s", label=label, ms=4)
            ax2.plot(xs, ys, "k--s" if base == "sdpa" else "k-o", label=label, ms=4, alpha=0.4)
            continue
        kw = dict(color=HASH_COLORS.get(h), marker="o", ms=4)
        if base == "ours":
            ax1.plot(xs, ys, "-", label=f"LSH-{h}", **kw)
        ax2.plot(xs, ys, IMPL_STYLES.get(base, "-."), label=f"{base} LSH-{h}", **kw)
    lengths = sorted({r["length"] for r in rows})
    for ax, title in ((ax1, "ours (paper Figure 5)"), (ax2, "ours (solid) vs peers")):
        ax.set(xscale="log", yscale="log", xlabel="sequence length (tokens per step fixed)",
               ylabel="seconds per forward+backward", title=title)
        ax.set_xticks(lengths, [str(t) for t in lengths])
    ax1.legend(fontsize=6, ncol=2)
    ax2.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save(fig, path)


def memory_hashes(rows, impls, n_hashes, path):
    """Peak memory of the LSH layer against length, a line per implementation and n_hashes."""
    fig, (ax,) = figure()
    for impl in impls:
        for h in n_hashes:
            pts = sorted((r["length"], r["delta_mb"]) for r in rows
                         if r["impl"] == impl and r["n_hashes"] == h and r.get("delta_mb", 0) > 0)
            if pts:
                ax.plot(*zip(*pts), IMPL_STYLES[impl], color=HASH_COLORS.get(h), marker="o", ms=4,
                        label=f"{impl} LSH-{h}")
    ax.set(xscale="log", yscale="log", xlabel="sequence length (tokens per step fixed)",
           ylabel="peak MB above baseline", title="LSH layer memory (solid: ours)")
    if ax.lines:   # a tiny run may measure nothing above the baseline
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save(fig, path)


def memory_depth(rows, layers, length, path):
    """Peak memory of a training step against depth: residual or reversible, ff_chunks 1 or 8."""
    fig, (ax,) = figure()
    groups = [(rev, ch) for rev in (False, True) for ch in (1, 8)]
    width = 0.8 / len(groups)
    for i, (rev, ch) in enumerate(groups):
        ys = [next((r.get("delta_mb", 0) for r in rows if r["n_layers"] == L and r["reversible"]
                    == rev and r["ff_chunks"] == ch and r["length"] == length), 0) for L in layers]
        ax.bar([j + i * width for j in range(len(layers))], ys, width,
               label=f"{'reversible' if rev else 'residual'}, ff_chunks={ch}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], [str(L) for L in layers])
    ax.set(xlabel="layers", ylabel="peak MB above baseline",
           title=f"training-step memory at length {length}")
    ax.legend(fontsize=7)
    return save(fig, path)


def throughput(rows, path):
    """Training tokens/s of whole models, ours green, the peers grey."""
    fig, (ax,) = figure()
    ok = [r for r in rows if "tokens_per_s" in r]
    ax.bar(range(len(ok)), [r["tokens_per_s"] for r in ok],
           color=[OURS_COLOR if r["impl"] == "ours" else PEER_COLOR for r in ok])
    ax.set_xticks(range(len(ok)), [f"{r['impl']}\nT={r['length']} L={r['n_layers']}" for r in ok],
                  fontsize=7)
    ax.set(ylabel="training tokens/s", title="whole-model training throughput")
    return save(fig, path)
