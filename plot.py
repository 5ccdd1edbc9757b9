"""
The figures of train.py (loss.png: the training and validation loss) and of bench.py (one per
sub-command), in one place with one palette. matplotlib is imported only when a figure is drawn,
with the Agg backend, so no display is needed.

    import plot
    plot.loss_curves(records, 'out/loss.png')           # records: the lines of log.jsonl, as dicts
    fig, (ax,) = plot.figure(); ...; plot.save(fig, 'bench_results/throughput.png')
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
