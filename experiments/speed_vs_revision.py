"""
Part 2 of lsh_attention.py at another git revision against the working tree, side by side: the
same LSHSelfAttention weights and input, forward+backward timed alternately (old, new, old, ...),
the median of each, and the ratio old / new (> 1: the working tree is faster). For checking that a
change kept Part 2 as fast as it was; bench.py speed measures the layers themselves.

    python -m experiments.speed_vs_revision dd6b1cd
    python -m experiments.speed_vs_revision dd6b1cd --lengths 1024,4096 --n_hashes 1,4 --dedup
"""
import argparse
import importlib.util
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import lsh_attention as new_module

ROOT = Path(__file__).resolve().parents[1]


def module_at(rev):
    """lsh_attention.py as it was at git revision rev, imported under another name."""
    text = subprocess.run(["git", "show", f"{rev}:lsh_attention.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "lsh_attention_old.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("lsh_attention_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step_of(module, state, x, g, args, n_hashes):
    layer = module.LSHSelfAttention(args.d_model, args.n_heads, bucket_size=args.bucket_size,
                                    n_hashes=n_hashes, causal=True, dedup=args.dedup)
    layer.load_state_dict(state)

    def step():
        torch.manual_seed(0)                       # the same rotations in both
        (layer(x) * g).sum().backward()
        x.grad = None
        layer.zero_grad(set_to_none=True)
    return step


def main():
    ints = lambda s: [int(v) for v in s.split(",")]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rev", help="the git revision to compare against, e.g. dd6b1cd")
    p.add_argument("--lengths", type=ints, default=[1024, 4096], help="sequence lengths T")
    p.add_argument("--n_hashes", type=ints, default=[1, 4], help="LSH rounds")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per step: B = tokens // T")
    p.add_argument("--d_model", type=int, default=256, help="model width C")
    p.add_argument("--n_heads", type=int, default=4, help="attention heads nh")
    p.add_argument("--bucket_size", type=int, default=64, help="chunk length m")
    p.add_argument("--dedup", action="store_true", help="both layers with dedup=True (step 6)")
    p.add_argument("--repeats", type=int, default=7, help="timed steps of each; medians compared")
    args = p.parse_args()
    old_module = module_at(args.rev)
    print(f"old: lsh_attention.py at {args.rev}; new: the working tree; forward+backward of "
          f"LSHSelfAttention(impl='fast', causal=True{', dedup=True' if args.dedup else ''}), "
          f"{args.tokens} tokens per step, median of {args.repeats}")
    for T in args.lengths:
        for h in args.n_hashes:
            torch.manual_seed(0)
            state = new_module.LSHSelfAttention(args.d_model, args.n_heads, bucket_size=args.bucket_size,
                                                 n_hashes=h).state_dict()
            x = torch.randn(args.tokens // T, T, args.d_model, requires_grad=True)
            g = torch.randn_like(x)
            steps = {"old": step_of(old_module, state, x, g, args, h),
                     "new": step_of(new_module, state, x, g, args, h)}
            times = {k: [] for k in steps}
            for k in steps:                        # warm-up, untimed
                steps[k]()
            for _ in range(args.repeats):
                for k, step in steps.items():
                    t0 = time.perf_counter()
                    step()
                    times[k].append(time.perf_counter() - t0)
            old, new = (statistics.median(times[k]) for k in ("old", "new"))
            print(f"T={T:>6} LSH-{h}: old {old:.3f} s  new {new:.3f} s  old/new {old / new:.2f}x")


if __name__ == "__main__":
    main()
