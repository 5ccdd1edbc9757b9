"""
The figures of train.py (loss.png: the training and validation loss), of bench.py (one per
sub-command: speed, memory-hashes, memory-depth, throughput) and of lsh_attention.py (the steps of
LSH attention for one small example), in one place with one palette. matplotlib is imported only
when a figure is drawn, with the Agg backend: no display needed.

    python plot.py lsh_attention                        # writes lsh_attention.png (README figure)
    python plot.py lsh_attention --out /tmp/lsh.png

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


# ------------------------------------------------------------------ lsh_attention.py's figure

def lsh_attention_steps(path="lsh_attention.png", T=32, m=4, n_hashes=2, seed=0):
    """Steps 1, 2, 4 and the resulting attention (7-9) of causal lsh_attention for one sequence
    of T clustered vectors, beside full attention. The attention weights are read off the real
    functions: with v the identity matrix, output row i is query i's weights over the keys."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    import torch.nn.functional as F
    from lsh_attention import full_attention, hash_vectors, lsh_attention

    g = torch.Generator().manual_seed(seed)
    hs, n_clusters = 8, 6              # similar vectors in clusters, so that buckets mean something
    centres = F.normalize(torch.randn(n_clusters, hs, generator=g), dim=-1)
    which = torch.randint(0, n_clusters, (T,), generator=g)
    qk = 8 * F.normalize(centres[which] + 0.2 * torch.randn(T, hs, generator=g), dim=-1)
    qk = qk.unsqueeze(0)                                               # (1, T, hs)
    rot = torch.randn(hs, n_hashes, T // m // 2, generator=g)          # R, one per round
    buckets = hash_vectors(qk, T // m, n_hashes, rot)[0]               # (n_hashes, T)
    eye = torch.eye(T).unsqueeze(0)                                    # v = I: weights come out
    rounds = [lsh_attention(qk, eye, m, 1, causal=True, rotations=rot[:, r:r + 1])[0]
              for r in range(n_hashes)]                                # round r alone: (T, T)
    combined = lsh_attention(qk, eye, m, n_hashes, causal=True, rotations=rot)[0]
    full = full_attention(qk, None, eye, causal=True, shared_qk=True)[0]

    fig, axes = plt.subplots(n_hashes + 1, 3, figsize=(15, 4.6 * (n_hashes + 1)))
    colour = plt.get_cmap("tab10")
    norm = matplotlib.colors.PowerNorm(0.5, vmin=0, vmax=1)          # small weights visible
    show = lambda ax, w, title: (ax.imshow(w.numpy(), cmap="Blues", norm=norm), ax.set(
        title=title, xlabel="key position j", ylabel="query position i"))
    for r in range(n_hashes):
        b = buckets[r]
        ax = axes[r, 0]
        ax.bar(range(T), (b + 1).numpy(), color=[colour(int(k) % 10) for k in b])
        ax.set(title=f"round {r + 1}, step 1: the bucket of each position\n"
                     "h(x) = argmax([xR ; -xR])", xlabel="position i", ylabel="bucket",
               yticks=range(1, T // m + 1), yticklabels=range(T // m))
        order = (b * T + torch.arange(T)).argsort()                    # step 2
        ax = axes[r, 1]                                                # step 4: one row a chunk
        ax.imshow(b[order].view(T // m, m).numpy(), cmap=colour, vmin=0, vmax=9.99)
        for s, i in enumerate(order.tolist()):
            ax.text(s % m, s // m, str(i), ha="center", va="center", fontsize=10)
        ax.set(title="steps 2 and 4: positions sorted by (bucket, position),\n"
                     f"cut into chunks of m = {m} (colour: bucket)", xticks=[],
               ylabel="chunk", yticks=range(T // m))
        show(axes[r, 2], rounds[r], f"round {r + 1} alone: every chunk attends to\n"
                                    "itself and the chunk before it")
    ax = axes[n_hashes, 0]
    ax.axis("off")
    ax.text(0, 0.5, f"T = {T} vectors in {n_clusters} clusters, hs = {hs},\n"
                    f"bucket_size m = {m}: n_buckets = n_chunks = {T // m};\n"
                    f"n_hashes = {n_hashes}; causal.\n\n"
                    "Blue: the weight of key j for query i, read off\n"
                    "lsh_attention itself (v = the identity matrix).\n"
                    "Step 9 combines the rounds by their normalisers:\n"
                    "softmax over the union of the rounds' windows.\n"
                    "A query's own key (-1e5) is used only when\n"
                    "nothing else is there (position 0).", va="center", fontsize=11)
    show(axes[n_hashes, 1], combined, f"steps 7-9: all {n_hashes} rounds combined")
    show(axes[n_hashes, 2], full, "full attention: the same logits and masks,\nevery key")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


FIGURES = {"lsh_attention": lsh_attention_steps}   # the figures drawn from the command line


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Draw a figure that needs no run's results.")
    parser.add_argument("figure", choices=list(FIGURES),
                        help="lsh_attention: the steps of LSH attention (lsh_attention.py, "
                             "paper Section 2) for one small example")
    parser.add_argument("--out", default=None, help="the PNG to write (default: <figure>.png)")
    args = parser.parse_args()
    print("wrote", FIGURES[args.figure](args.out or f"{args.figure}.png"))
