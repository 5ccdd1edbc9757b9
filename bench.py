"""
Benchmarks: the Reformer's speed and memory claims measured on this machine, against the two
public implementations (reformer-pytorch, Hugging Face transformers) when they are installed.

Sub-commands (each prints a table and writes <out>/<name>.json and <out>/<name>.png):
    speed          seconds per forward+backward of one attention layer, tokens per step fixed
                   (paper Figure 5): ours LSH-1/2/4/8, our full attention, PyTorch SDPA, the peers;
                   FLOPs of each LSH row, achieved FLOP/s, and that as a fraction of the machine's
                   own matmul rate measured in the same run
    memory-depth   peak memory of a training step of ReformerLM for 2/6/12 layers, reversible or
                   not, chunked feed-forward or not (paper Table 3, the n_l factor)
    memory-hashes  peak memory of the LSH layer by n_hashes and length, ours and the peers (paper
                   Table 3, the b n_h l n_r c term)
    throughput     tokens/s of a whole training step (forward, backward, AdamW), our ReformerLM
                   against reformer-pytorch's ReformerLM at the same configuration
    profile        torch.profiler's top ops of one step of our LSH layer (not part of `all`)
    translation-step  a training step (forward, backward, Adam) of our encoder-decoder beside
                   torch.nn.Transformer of the same size, reversible or not, dropout 0.1 and 0,
                   and ours with one change undone per row (what each change buys); no plot,
                   not part of `all`
    decode         translation decoding tokens/s, every hypothesis forced to L tokens: ours
                   with the key/value cache, ours recomputing the prefix, Hugging Face's
                   MarianMTModel.generate() of the same size (greedy and beam); no plot, not
                   part of `all`
    all            the suite above at CPU-sized lengths (the default; < 10 minutes on 2 cores)

    python bench.py                                      # the CPU-sized suite
    python bench.py speed                                # Figure 5 at 1K..16K (32K on CUDA)
    python bench.py speed --compile                      # our layers under torch.compile
    python bench.py speed --dedup --lengths 1024,4096 --n_hashes 4,8   # the cost of dedup
    python bench.py speed --device cuda --dtype bf16 --lengths 1024,4096,16384,32768
    python bench.py memory-depth --lengths 8192
    python bench.py profile --lengths 16384 --n_hashes 4
    python bench.py translation-step --threads 1      # 3 + 3 layers, d 256, 4,096 tokens a step
    python bench.py decode --threads 1 --lengths 64   # 16 sentences, 32 source tokens, L = 64
    pip install -r requirements-bench.txt                # the peers; skipped when missing

How each row is measured (what a timed layer contains, the round-robin timing, peak RSS in a
fresh process per memory row): experiments/bench_results/README.md, section Method.
"""
import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F

import plot
from lsh_attention import LSHSelfAttention
from model import ModelConfig, ReformerLM

# Default sizes per sub-command. `all` on a CPU overrides them with ALL_CPU to stay under 10 minutes
# on 2 cores: the full speed sweep with both peers alone takes ~12, most of it the peers' LSH-8.
DEFAULTS = {
    "speed":         dict(lengths=[1024, 2048, 4096, 8192, 16384], n_hashes=[1, 2, 4, 8]),
    "memory-depth":  dict(lengths=[8192], n_hashes=[2], layers=[2, 6, 12]),
    "memory-hashes": dict(lengths=[1024, 4096, 16384], n_hashes=[1, 2, 4, 8]),
    "throughput":    dict(lengths=[4096], n_hashes=[2], layers=[6]),
    "profile":       dict(lengths=[16384], n_hashes=[4]),
    "translation-step": dict(lengths=[32], tokens=4096, layers=[3]),   # sentence length
    "decode":        dict(lengths=[64], layers=[3]),                    # target tokens L
}
ALL_CPU = {
    "speed":         dict(lengths=[1024, 16384]),
    "memory-depth":  dict(lengths=[8192], layers=[2, 12]),
    "memory-hashes": dict(lengths=[16384]),
    "throughput":    dict(layers=[2]),
}
CUDA_EXTRA_LENGTHS = {"speed": [32768]}   # the paper's longest length, where a GPU has the memory
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PEERS = ("reformer-pytorch", "transformers")   # PyPI names; imported only when installed


# --------------------------------------------------------------------- the machine, timing, output

def device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(step, repeats, warmup, device):
    """Median seconds of `repeats` calls of step() after `warmup` calls (not timed)."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def matmul_rate(device, dtype, n=2048, repeats=5):
    """FLOP/s of one large square matmul: the ceiling that the FLOP fractions are relative to."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t, _ = median_time(lambda: a @ b, repeats, 2, device)
    return 2 * n ** 3 / t


def stream_rate(device, mb=256, repeats=5):
    """Bytes/s of reading one tensor far larger than the caches (a sum, one pass): the ceiling of
    a step that must read every weight once, as a cached decoding step does (decode_bytes)."""
    x = torch.ones(mb * 2 ** 18, device=device)                        # mb MB of float32
    t, _ = median_time(lambda: x.sum(), repeats, 2, device)
    return x.numel() * x.element_size() / t


def peer_version(name):
    """Version string of an installed peer, or None. Imports nothing heavy."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def peers_to_run(args):
    """{name: version} of the peers to measure: the installed ones, unless --no_peers."""
    if args.no_peers:
        return {}
    found = {name: peer_version(name) for name in PEERS}
    for name, v in found.items():
        if v is None:
            print(f"skipped: {name} not installed (pip install -r requirements-bench.txt)")
    return {name: v for name, v in found.items() if v is not None}


def code_version():
    """The commit measured, '+dirty' when the model files differ from it (they are timed)."""
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True,
                                    cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    files = ["lsh_attention.py", "model.py", "reversible.py", "chunked_ff.py"]
    return (git("rev-parse", "--short", "HEAD") or "unknown") + \
        ("+dirty" if git("status", "--porcelain", *files) else "")


def save(args, command, rows, extra=None):
    """Write <out>/<command>.json with the machine, versions, command line and rows."""
    os.makedirs(args.out, exist_ok=True)
    record = dict(command=command, argv=sys.argv[1:], date=datetime.datetime.now().isoformat(
        timespec="seconds"), device=device_name(args.device), torch=torch.__version__,
        python=platform.python_version(), code=args.code, load_at_start=args.load_at_start,
        load_at_end=list(os.getloadavg()),
        peers={name: peer_version(name) for name in PEERS}, dtype=args.dtype,
        d_model=args.d_model, n_heads=args.n_heads, bucket_size=args.bucket_size,
        tokens=args.tokens, repeats=args.repeats, compile=args.compile,
        reuse_memory=getattr(args, "reuse_memory", False), **(extra or {}),
        rows=rows)
    path = os.path.join(args.out, f"{command}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    return path


# The columns of the printed tables: row key -> (header, format).
COLUMNS = dict(impl=("impl", "{}"), n_hashes=("n_hashes", "{}"), length=("length", "{}"),
               batch=("batch", "{}"), n_layers=("layers", "{}"), reversible=("reversible", "{}"),
               ff_chunks=("ff_chunks", "{}"), params_m=("params (M)", "{:.2f}"),
               seconds=("s/step", "{:.3f}"), cpu_seconds=("CPU s/step", "{:.3f}"),
               tokens_per_s=("tokens/s", "{:.0f}"),
               peak_mb=("peak MB", "{:.0f}"), delta_mb=("peak MB above base", "{:.0f}"),
               logits_mb=("logits MB", "{:.0f}"), gflop=("GFLOP", "{:.1f}"),
               gflop_per_s=("GFLOP/s", "{:.1f}"), matmul_fraction=("of matmul", "{:.0%}"),
               vs_ours=("x ours", "{:.2f}"), dropout=("dropout", "{}"), error=("error", "{}"))


def report(args, name, title, rows, keys, extra=None, headers=None):
    """Print the title and the table of `keys` (plus error), write <out>/<name>.json; its path."""
    print(f"\n{title}")
    headers = dict(COLUMNS, **(headers or {}))
    print_table(rows, [(k, *headers[k]) for k in [*keys, "error"]])
    return save(args, name, rows, extra)


def progress(label, row, result):
    print(f"  {label}: " + (row.get("error") or result), flush=True)


def print_table(rows, columns):
    """rows: list of dicts; columns: list of (key, header, format)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else fmt.format(r[k]) if not isinstance(r[k], str)
                       else r[k]) for k, _, fmt in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for i, line in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def ratio_to_ours(rows, value, keys, is_ours, out="vs_ours", include_ours=False):
    """row[out] = row[value] / the value of our row with the same `keys` (> 1: ours is smaller,
    i.e. faster or lighter); for the other rows only, unless include_ours."""
    ours = {tuple(r[k] for k in keys): r[value] for r in rows if is_ours(r) and value in r}
    for r in rows:
        key = tuple(r[k] for k in keys)
        if value in r and key in ours and (include_ours or not is_ours(r)):
            r[out] = r[value] / max(ours[key], 1e-9)


def base_impl(row):
    return row["impl"].split(" (")[0]   # 'ours (compiled)' -> 'ours'


# ------------------------------------------------ the layers: ours and the peers, configured alike

class _HFLayer(torch.nn.Module):
    """Hugging Face's LSHSelfAttention plus the output projection that ReformerSelfOutput adds,
    so that it contains what ours contains (projections, attention, output projection)."""

    def __init__(self, args, n_hashes, T):
        super().__init__()
        from transformers import ReformerConfig
        from transformers.models.reformer import modeling_reformer as hf
        cfg = ReformerConfig(hidden_size=args.d_model, num_attention_heads=args.n_heads,
                             attention_head_size=args.d_model // args.n_heads,
                             attn_layers=["lsh"], lsh_attn_chunk_length=args.bucket_size,
                             num_hashes=n_hashes, num_buckets=max(2, T // args.bucket_size),
                             is_decoder=True, lsh_num_chunks_before=1, lsh_num_chunks_after=0,
                             lsh_attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
                             max_position_embeddings=T)
        self.attn = hf.LSHSelfAttention(cfg)
        self.out = hf.ReformerSelfOutput(cfg)

    def forward(self, x):
        return self.out(self.attn(hidden_states=x).hidden_states)


class _SDPALayer(torch.nn.Module):
    """What a user has today: q, k, v projections, F.scaled_dot_product_attention (its fused
    flash kernels, which need 4-D (B, nh, T, hs) inputs, on CPU as on CUDA), output projection.
    Given 3-D (B*nh, T, hs) inputs, SDPA on CPU falls back to its math kernel, which builds the
    (T, T) weights: 10x slower at T = 16K on 2 cores (49.7 s against 4.6 s per step)."""

    def __init__(self, d_model, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = torch.nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = torch.nn.Linear(d_model, d_model)

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                   # 3 x (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, C))   # (B, T, C)


def build_layer(impl, n_hashes, T, args):
    """One attention layer (B, T, C) -> (B, T, C): 'ours' (LSH), 'ours-reference' (the same LSH
    layer running lsh_attention.py's Part 1), 'ours-dedup' (ours with dedup=True, step 6),
    'ours-full', 'sdpa' or a peer."""
    C, nh, m = args.d_model, args.n_heads, args.bucket_size
    if impl in ("ours", "ours-reference", "ours-dedup"):
        return LSHSelfAttention(C, nh, bucket_size=m, n_hashes=n_hashes, causal=True, attn="lsh",
                                impl="reference" if impl == "ours-reference" else "fast",
                                dedup=impl == "ours-dedup")
    if impl == "ours-full":
        return LSHSelfAttention(C, nh, bucket_size=m, n_hashes=1, causal=True, attn="full",
                                shared_qk=True)
    if impl == "sdpa":
        return _SDPALayer(C, nh)
    if impl == "reformer-pytorch":
        from reformer_pytorch import LSHSelfAttention as PeerLSH
        return PeerLSH(dim=C, heads=nh, bucket_size=m, n_hashes=n_hashes, causal=True)
    if impl == "transformers":
        return _HFLayer(args, n_hashes, T)
    raise ValueError(f"unknown implementation {impl!r}")


def layer_step(layer, B, T, args, compile=False):
    """A closure running one forward+backward of the layer on a fixed (B, T, C) input."""
    dtype = DTYPES[args.dtype]
    layer = layer.to(args.device, dtype).train()
    fn = layer
    if compile:
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch._inductor")
        torch._dynamo.reset()   # a fresh cache per configuration: no recompile limit, no dynamic
        fn = torch.compile(layer, dynamic=False)
    x = torch.randn(B, T, args.d_model, device=args.device, dtype=dtype, requires_grad=True)
    g = torch.randn(B, T, args.d_model, device=args.device, dtype=dtype)
    params = list(layer.parameters())

    def step():
        y = fn(x)
        (y * g).sum().backward()
        x.grad = None
        for p in params:
            p.grad = None
    return step


def lsh_flops(B, T, C, nh, m, n_hashes):
    """FLOPs of one forward+backward of the LSH layer, counted from what lsh_attention.py does.
    A multiply-add is 2 FLOPs; the backward of a matmul is two matmuls of its size (dX, dW).

        projections   3 linears (qk, v, out) of 2 B T C^2, x3 with backward
        hashing       x @ R: 2 B nh T hs (R n_buckets / 2), forward only (no gradient)
        chunks        S = q k^T and o = P v over (m, 2m) windows: 2 x 2 (n m) 2m hs forward, with
                      n = B nh R (nc + 1) - 1 query chunks (the 1 / nc extra ones are computed and
                      thrown away, lsh_attention.py's chunk layout); backward does dV, dP, dQ, dK:
                      twice the forward, so x3 in all
    Element-wise passes (masks, softmax, sort, gathers, round combination) are not counted.
    """
    hs, n_buckets = C // nh, T // m
    proj = 3 * 2 * B * T * C * C * 3
    hashing = 2 * B * nh * T * hs * n_hashes * n_buckets // 2
    n_chunks = B * nh * n_hashes * (n_buckets + 1) - 1
    chunks = 2 * 2 * n_chunks * m * 2 * m * hs * 3
    return proj + hashing + chunks


def batch_for(T, args):
    return max(1, args.tokens // T)


# ------------------------------------------------------------ speed: paper Figure 5, peers, FLOP/s

def speed_groups(args, peers):
    """(T, [(impl, n_hashes or None), ...]): the layers timed together, in order."""
    for T in args.lengths:
        for h in args.n_hashes:
            dedup = ("ours-dedup",) if args.dedup and h > 1 else ()
            yield T, [(impl, h) for impl in ("ours", "ours-reference", *dedup, *peers)]
        full = [("ours-full", None)] if T <= args.max_full_len else []
        yield T, full + [("sdpa", None)]


def measure_group(group, T, args):
    """Rows for the group's layers at length T, timed round-robin: repeat r of every layer runs
    before repeat r + 1 of any, so a busy moment on a shared machine slows them all alike."""
    B = batch_for(T, args)
    cuda = args.device.startswith("cuda")
    rows, steps = [], []
    for impl, h in group:
        compile = args.compile and impl in ("ours", "ours-full", "sdpa")
        row = dict(impl=impl + (" (compiled)" if compile else ""), n_hashes=h, length=T, batch=B)
        rows.append(row)
        torch.manual_seed(0)
        try:
            step = layer_step(build_layer(impl, h, T, args), B, T, args, compile)
            for _ in range(args.warmup + compile):   # compilation happens here, untimed
                step()
            if cuda:   # one step alone, for the allocator's peak above what is already there
                base, peak = cuda_peak(step)
                row["peak_mb"] = (peak - base) / 2 ** 20
            steps.append((row, step))
        except Exception as e:   # an OOM or a compile failure is a result, not a crash
            row["error"] = error_text(e)
    for _ in range(args.repeats):
        for row, step in steps:
            if "error" in row:
                continue
            try:
                t0 = time.perf_counter()
                step()
                sync(args.device)
                row.setdefault("all_seconds", []).append(time.perf_counter() - t0)
            except Exception as e:
                row["error"] = error_text(e)
    for row in rows:
        if "error" in row:
            continue
        row["seconds"] = statistics.median(row["all_seconds"])
        row["tokens_per_s"] = B * T / row["seconds"]
        if row["n_hashes"] is not None:
            row["gflop"] = lsh_flops(B, T, args.d_model, args.n_heads, args.bucket_size,
                                     row["n_hashes"]) / 1e9
            row["gflop_per_s"] = row["gflop"] / row["seconds"]
    return rows


def error_text(e):
    """The exception's type and first line, short enough for a table cell."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:120]}"


def speed(args):
    peers = peers_to_run(args)
    dtype = DTYPES[args.dtype]
    before = matmul_rate(args.device, dtype)
    print(f"matmul 2048^3 {args.dtype}: {before / 1e9:.0f} GFLOP/s on {device_name(args.device)}")
    name = "speed" + ("-compile" if args.compile else "") + ("-reuse" if args.reuse_memory else "") \
        + ("-dedup" if args.dedup else "")
    rows = []
    for T, group in speed_groups(args, peers):
        for row in measure_group(group, T, args):
            rows.append(row)
            progress(f"{row['impl']:>22} n_hashes={row['n_hashes'] or '-'} T={T}", row,
                     f"{row.get('seconds', 0):.3f} s")
        save(args, name, rows, dict(partial=True))   # a run cut short keeps what it measured
    # The ceiling: the better of two measurements, before and after (the machine may be shared).
    after = matmul_rate(args.device, dtype)
    peak = max(before, after)
    print(f"matmul 2048^3 {args.dtype}: {after / 1e9:.0f} GFLOP/s after the sweep")
    for row in rows:
        if "gflop_per_s" in row:
            row["matmul_fraction"] = row["gflop_per_s"] * 1e9 / peak
    # peer time / our time at the same n_hashes and length: > 1 means we are faster
    ratio_to_ours(rows, "seconds", ("n_hashes", "length"), lambda r: base_impl(r) == "ours")
    keys = ["impl", "n_hashes", "length", "batch", "seconds", "tokens_per_s",
            *(["peak_mb"] if args.device.startswith("cuda") else []), "gflop", "gflop_per_s",
            "matmul_fraction", "vs_ours"]
    path = report(args, name, f"speed: forward+backward of one layer, {args.tokens} tokens per "
                  f"step, median of {args.repeats}; 'x ours' = peer time / our time", rows, keys,
                  dict(matmul_gflop_per_s=[before / 1e9, after / 1e9]))
    summarize_speed(rows, peers)
    plot.speed(rows, os.path.join(args.out, f"{name}.png"))
    print(f"wrote {path}")
    return rows


def summarize_speed(rows, peers):
    """The claims in one line each: flat in length, speed-up over the faster peer."""
    by = {}
    for r in rows:
        if "seconds" in r:
            by.setdefault((base_impl(r), r["n_hashes"]), {})[r["length"]] = r["seconds"]
    for (impl, h), series in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        if impl == "ours" and len(series) > 1:
            lo, hi = min(series), max(series)
            line = f"ours LSH-{h}: {hi} vs {lo}: {series[hi] / series[lo]:.2f}x time"
            ups = [min(by[(p, h)][T] for p in peers if T in by.get((p, h), {})) / s
                   for T, s in series.items() if any(T in by.get((p, h), {}) for p in peers)]
            if ups:
                line += f"; faster peer / ours: {min(ups):.2f}x to {max(ups):.2f}x"
            print(line)


# ---------------------- memory: each configuration in its own process on CPU (peak RSS only grows)

def build_lm(spec):
    """Ours or reformer-pytorch's ReformerLM, from a spec dict; returns (model, forward->loss)."""
    T, L, h = spec["length"], spec["n_layers"], spec["n_hashes"]
    C, nh, m, d_ff, V = spec["d_model"], spec["n_heads"], spec["bucket_size"], spec["d_ff"], 256
    if spec["impl"] == "ours":
        cfg = ModelConfig(vocab_size=V, max_seq_len=T, n_layers=L, d_model=C, n_heads=nh,
                          d_ff=d_ff, attn="lsh", n_hashes=h, bucket_size=m,
                          reversible=spec["reversible"], ff_chunks=spec["ff_chunks"],
                          tie_weights=False)
        model = ReformerLM(cfg)
        return model, lambda idx, tgt: model(idx, tgt)[1]
    from reformer_pytorch import ReformerLM as PeerLM   # always reversible (reverse_thres=0)
    rows, cols = ModelConfig(max_seq_len=T).axial_dims()
    model = PeerLM(num_tokens=V, dim=C, depth=L, max_seq_len=T, heads=nh, dim_head=C // nh,
                   bucket_size=m, n_hashes=h, ff_chunks=spec["ff_chunks"], ff_mult=d_ff // C,
                   causal=True, axial_position_emb=True, axial_position_shape=(rows, cols))
    ce = torch.nn.functional.cross_entropy
    return model, lambda idx, tgt: ce(model(idx).flatten(0, 1), tgt.flatten())


def make_step(spec):
    """A closure for one training step (forward + backward) of the spec's layer or model."""
    args = argparse.Namespace(**spec)
    T, B = spec["length"], spec["batch"]
    if spec["kind"] == "layer":
        return layer_step(build_layer(spec["impl"], spec["n_hashes"], T, args), B, T, args)
    return lm_step(spec)[1]


def lm_step(spec, adamw=False):
    """(model, a closure for one training step: forward, backward, with adamw an AdamW step)."""
    model, loss_fn = build_lm(spec)
    model.to(spec["device"]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if adamw else None
    idx, tgt = (torch.randint(0, 256, (spec["batch"], spec["length"]), device=spec["device"])
                for _ in range(2))

    def step():
        loss_fn(idx, tgt).backward()
        if opt:
            opt.step()
        model.zero_grad(set_to_none=True)
    return model, step


def cuda_peak(step):
    """(bytes allocated before, peak bytes allocated during) one call of step() on CUDA."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return base, torch.cuda.max_memory_allocated()


def peak_rss():
    """Peak resident memory of this process in bytes. Linux: VmHWM, because ru_maxrss of a child
    process starts at its parent's peak (exec records the old address space's peak)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024   # bytes on macOS, KB elsewhere


def reset_peak_rss():
    """Set the peak to the current RSS (Linux >= 4.0); elsewhere the peak so far stays."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def mem_worker(spec):
    """Peak memory of one step of spec, in this process. Returns a dict of MB."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cuda = spec["device"].startswith("cuda")
    tiny = dict(spec, length=4 * spec["bucket_size"], batch=1)
    make_step(tiny)()   # lazy initialisation (thread pools, kernels) belongs to the baseline
    step = make_step(spec)
    if cuda:
        base, peak = cuda_peak(step)
    else:
        reset_peak_rss()
        base = peak_rss()
        step()
        peak = peak_rss()
    mb = 2 ** 20
    return dict(baseline_mb=base / mb, peak_mb=peak / mb, delta_mb=(peak - base) / mb)


def measure_memory(spec):
    """mem_worker(spec), in a fresh process on CPU. Failures come back as {'error': ...}."""
    if spec["device"].startswith("cuda"):
        try:
            return mem_worker(spec)
        except Exception as e:
            return dict(error=error_text(e))
    cmd = [sys.executable, os.path.abspath(__file__), "_mem_worker", "--json", json.dumps(spec)]
    # glibc's malloc keeps freed blocks below its mmap threshold (which grows up to 32 MB as
    # large blocks are freed) in its heap, so RSS would also count memory that PyTorch has
    # already freed: a 12-layer reversible model at 8K then "uses" 2.8x its live peak. A fixed
    # threshold of 64 KB returns every larger block to the OS on free: RSS follows live tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1]
        return dict(error=f"exit {p.returncode}: {last[:120]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def base_spec(args, **kw):
    return dict(dict(device=args.device, dtype=args.dtype, threads=args.threads,
                     d_model=args.d_model, n_heads=args.n_heads, bucket_size=args.bucket_size,
                     d_ff=args.d_ff, compile=False), **kw)


def memory_hashes(args):
    peers = peers_to_run(args)
    rows = []
    for T in args.lengths:
        B = batch_for(T, args)
        for impl in ["ours", *peers]:
            for h in args.n_hashes:
                spec = base_spec(args, kind="layer", impl=impl, n_hashes=h, length=T, batch=B)
                # paper Table 3: b n_h l n_r c, with c = 2m (a chunk and the one before it)
                logits_mb = B * args.n_heads * T * h * 2 * args.bucket_size * 4 / 2 ** 20
                row = dict(impl=impl, n_hashes=h, length=T, batch=B, logits_mb=logits_mb,
                           **measure_memory(spec))
                rows.append(row)
                progress(f"{impl:>16} n_hashes={h} T={T}", row, f"{row.get('delta_mb', 0):.0f} MB")
    ratio_to_ours(rows, "delta_mb", ("n_hashes", "length"), lambda r: r["impl"] == "ours")
    title = (f"memory-hashes: peak memory of one forward+backward of the layer, {args.tokens} "
             f"tokens per step; 'logits' = b n_h l n_r c floats (c = 2 bucket_size), paper Table 3")
    path = report(args, "memory-hashes", title, rows, ["impl", "n_hashes", "length", "batch",
                  "delta_mb", "peak_mb", "logits_mb", "vs_ours"], dict(memory=memory_method(args)),
                  headers=dict(peak_mb=("peak MB total", "{:.0f}")))
    plot.memory_hashes(rows, ["ours", *peers], args.n_hashes,
                       os.path.join(args.out, "memory-hashes.png"))
    print(f"wrote {path}")
    return rows


def memory_method(args):
    return ("torch.cuda.max_memory_allocated above the allocation before the step"
            if args.device.startswith("cuda") else
            "peak RSS (VmHWM) of a fresh process per row, above the RSS after imports, model and "
            "input construction and a tiny warm-up step (the peak is reset there); glibc malloc "
            "with MALLOC_MMAP_THRESHOLD_=65536 so that freed blocks leave the RSS")


def memory_depth(args):
    rows = []
    for T in args.lengths:
        for L in args.layers:
            for reversible in (False, True):
                for ff_chunks in (1, 8):
                    spec = base_spec(args, kind="model", impl="ours", n_hashes=args.n_hashes[0],
                                     length=T, batch=1, n_layers=L, reversible=reversible,
                                     ff_chunks=ff_chunks)
                    row = dict(length=T, n_layers=L, reversible=reversible, ff_chunks=ff_chunks,
                               **measure_memory(spec))
                    rows.append(row)
                    progress(f"T={T} layers={L} reversible={reversible} ff_chunks={ff_chunks}",
                             row, f"{row.get('delta_mb', 0):.0f} MB")
    ratio_to_ours(rows, "delta_mb", ("length", "reversible", "ff_chunks"),
                  lambda r: r["n_layers"] == min(args.layers), "vs_fewest_layers", True)
    fewest = min(args.layers)
    title = (f"memory-depth: peak memory of a training step of ReformerLM, batch 1, LSH-"
             f"{args.n_hashes[0]}, d_model {args.d_model}, d_ff {args.d_ff}; 'x {fewest} layers' "
             f"= peak / peak of the {fewest}-layer model")
    path = report(args, "memory-depth", title, rows, ["length", "n_layers", "reversible",
                  "ff_chunks", "delta_mb", "peak_mb", "vs_fewest_layers"],
                  dict(memory=memory_method(args), d_ff=args.d_ff, n_hashes=args.n_hashes[0]),
                  headers=dict(peak_mb=("peak MB total", "{:.0f}"),
                               vs_fewest_layers=(f"x {fewest} layers", "{:.2f}")))
    plot.memory_depth(rows, args.layers, args.lengths[-1],
                      os.path.join(args.out, "memory-depth.png"))
    print(f"wrote {path}")
    return rows


# --------------------------- throughput: whole-model training steps, ours against reformer-pytorch

def throughput(args):
    peers = peers_to_run(args)
    rows = []
    impls = ["ours"] + (["reformer-pytorch"] if "reformer-pytorch" in peers else [])
    for T in args.lengths:
        B = batch_for(T, args)
        for L in args.layers:
            for impl in impls:
                spec = base_spec(args, kind="model", impl=impl, n_hashes=args.n_hashes[0],
                                 length=T, batch=B, n_layers=L, reversible=True, ff_chunks=1)
                rows.append(measure_throughput(spec, args))
                progress(f"{impl} T={T} layers={L}", rows[-1],
                         f"{rows[-1].get('tokens_per_s', 0):.0f} tokens/s")
    ratio_to_ours(rows, "tokens_per_s", ("length", "n_layers"), lambda r: r["impl"] == "ours",
                  include_ours=True)
    title = (f"throughput: training steps (forward, backward, AdamW) of a ReformerLM, reversible, "
             f"LSH-{args.n_hashes[0]}, d_model {args.d_model}, d_ff {args.d_ff}, median of "
             f"{args.repeats}")
    path = report(args, "throughput", title, rows, ["impl", "length", "batch", "n_layers",
                  "params_m", "seconds", "tokens_per_s", "vs_ours"],
                  dict(d_ff=args.d_ff, n_hashes=args.n_hashes[0]))
    plot.throughput(rows, os.path.join(args.out, "throughput.png"))
    print(f"wrote {path}")
    return rows


def measure_throughput(spec, args):
    row = dict(impl=spec["impl"], length=spec["length"], batch=spec["batch"],
               n_layers=spec["n_layers"])
    torch.manual_seed(0)
    try:
        model, step = lm_step(spec, adamw=True)
        row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        row["seconds"], row["all_seconds"] = median_time(step, args.repeats, args.warmup,
                                                         args.device)
    except Exception as e:
        row["error"] = error_text(e)
        return row
    row["tokens_per_s"] = spec["batch"] * spec["length"] / row["seconds"]
    return row


# ---------------------------------------- profile: where one step of our LSH layer spends its time

def profile(args):
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if args.device.startswith("cuda") else [])
    rows = []
    for T in args.lengths:
        for h in args.n_hashes:
            torch.manual_seed(0)
            B = batch_for(T, args)
            step = layer_step(build_layer("ours", h, T, args), B, T, args)
            for _ in range(args.warmup):
                step()
            with torch_profile(activities=activities) as prof:
                step()
                sync(args.device)
            sort_by = "self_cuda_time_total" if args.device.startswith("cuda") else \
                "self_cpu_time_total"
            print(f"\nprofile: ours LSH-{h}, length {T}, batch {B}")
            print(prof.key_averages().table(sort_by=sort_by, row_limit=args.top))
            events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
            total = sum(e.self_cpu_time_total for e in events)
            rows.append(dict(n_hashes=h, length=T, batch=B, total_ms=total / 1e3,
                             top=[dict(op=e.key, self_ms=e.self_cpu_time_total / 1e3,
                                       calls=e.count) for e in events[:args.top]]))
    path = save(args, "profile", rows)
    print(f"wrote {path}")
    return rows


# ------------------ translation-step: a training step of our encoder-decoder beside nn.Transformer

def _separate_qkv(attn, x):
    """LSHSelfAttention._qkv as three matmuls (the 'ours, q/k/v apart' rows): the same function,
    to time what the fused projection saves."""
    B, T, _ = x.shape
    heads = lambda y: y.view(B, T, attn.n_heads, attn.hs).transpose(1, 2)   # (B, nh, T, hs)
    return heads(attn.qk(x)), heads(attn.k(x)), heads(attn.v(x))


# Our rows, each one change away from "ours": what that change buys is its 'x ours' ratio.
TRANSLATION_VARIANTS = {
    "ours": {},                                   # SDPA encoder, fused q/k/v (the default)
    "ours, q/k/v apart": dict(qkv="apart"),       # three projections, not one
    "ours, explicit attention": dict(impl="reference"),   # Part 1's masked softmax, no SDPA
}


def translation_model(variant, reversible, dropout, args):
    """(model, config) for one row: ours in a TRANSLATION_VARIANTS variant, or nn.Transformer
    (compare_translation.TorchTransformerMT) with the same sizes."""
    from translation.encdec import EncDecConfig, ReformerEncDec
    cfg = EncDecConfig(vocab_size=args.vocab_size, n_layers=args.layers[0],
                       n_dec_layers=args.layers[0], d_model=args.d_model, n_heads=args.n_heads,
                       d_ff=args.d_ff, dropout=dropout, reversible=reversible,
                       impl=TRANSLATION_VARIANTS.get(variant, {}).get("impl", "fast"))
    if variant == "nn.Transformer":
        from translation.compare_translation import TorchTransformerMT
        return TorchTransformerMT(cfg)
    model = ReformerEncDec(cfg)
    if TRANSLATION_VARIANTS[variant].get("qkv") == "apart":
        for m in model.modules():
            if isinstance(m, LSHSelfAttention) and m.k is not None:
                m._qkv = _separate_qkv.__get__(m)
    return model


def translation_batch(B, S, T, V, device, seed=0):
    """src (B, S), tgt_in (B, T), targets (B, T): random sentences of S/2..S and T/2..T tokens
    (as length-bucketed batches have), PAD after each; targets -100 there."""
    g = torch.Generator().manual_seed(seed)
    def sentences(L):
        ids = torch.randint(3, V, (B, L), generator=g)
        n = torch.randint(L // 2, L + 1, (B,), generator=g)
        return ids.masked_fill(torch.arange(L)[None] >= n[:, None], 0)   # PAD = 0
    src, tgt = sentences(S), sentences(T + 1)
    targets = tgt[:, 1:].masked_fill(tgt[:, 1:] == 0, -100)
    tgt_in = tgt[:, :-1].clone()
    tgt_in[:, 0] = 1                                                       # BOS
    return src.to(device), tgt_in.to(device), targets.to(device)


def translation_step(args):
    L = args.lengths[0]
    B = args.tokens // L
    batch = translation_batch(B, L, L, args.vocab_size, args.device)
    variants = [*TRANSLATION_VARIANTS, "nn.Transformer"]
    rows = []
    for dropout in (0.1, 0.0):
        group = []      # one round-robin group: every row at this dropout, timed in turns
        for variant in variants:
            for reversible in ((True, False) if variant != "nn.Transformer" else (False,)):
                torch.manual_seed(0)
                model = translation_model(variant, reversible, dropout, args).to(args.device)
                params_m = sum(p.numel() for p in model.parameters()) / 1e6   # tied: once
                group.append((dict(impl=variant, reversible=reversible, dropout=dropout,
                                   batch=B, length=L, params_m=params_m),
                              _train_step(model, batch)))
        times = round_robin([step for _, step in group], args.repeats, args.warmup, args.device)
        for (row, _), (wall, cpu) in zip(group, times):
            rows.append(timed_row(row, wall, cpu, args.tokens))
            progress(f"{row['impl']} reversible={row['reversible']} dropout={dropout}", row,
                     f"{row['seconds']:.3f} s, {row['cpu_seconds']:.3f} CPU s")
    for value, suffix in (("cpu_seconds", ""), ("seconds", "_wall")):
        ratio_to_ours(rows, value, ("reversible", "dropout"), lambda r: r["impl"] == "ours",
                      out="vs_ours" + suffix)
        torch_rows = {r["dropout"]: r[value] for r in rows if r["impl"] == "nn.Transformer"}
        for r in rows:
            r["vs_torch" + suffix] = r[value] / torch_rows[r["dropout"]]
    title = (f"translation-step: one training step (forward, backward, Adam) of a {args.layers[0]}"
             f" + {args.layers[0]} layer encoder-decoder, d_model {args.d_model}, {args.n_heads} "
             f"heads, d_ff {args.d_ff}, vocab {args.vocab_size}, {B} x {L} source and target "
             f"tokens ({args.tokens} padded), median of {args.repeats} in turns; 'x ours' = CPU "
             f"s / ours' CPU s (> 1: ours is faster), 'x torch' = CPU s / nn.Transformer's; "
             f"the JSON has the wall-clock ratios too (vs_ours_wall, vs_torch_wall)")
    return report(args, "translation-step", title, rows,
                  ["impl", "reversible", "dropout", "params_m", "seconds", "cpu_seconds",
                   "vs_ours", "vs_torch"],
                  dict(vocab_size=args.vocab_size, n_layers=args.layers[0], d_ff=args.d_ff),
                  headers=dict(vs_torch=("x torch", "{:.2f}")))


def _train_step(model, batch):
    """A closure for one training step: forward, backward, an Adam step."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98))

    def step():
        model(*batch)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def round_robin(steps, repeats, warmup, device):
    """(wall seconds, CPU seconds) of each step's `repeats` calls, timed in turns (step 1, step 2,
    ..., step 1, ...) after `warmup` untimed calls of each, so a busy moment of a shared machine
    slows all alike. The CPU seconds (of this process, all its threads) leave out the time the
    process waited for a core: on a shared CPU the steadier measure of the work itself."""
    for step in steps:
        for _ in range(warmup):
            step()
    times = [([], []) for _ in steps]
    for _ in range(repeats):
        for step, (wall, cpu) in zip(steps, times):
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            sync(device)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return times


def timed_row(row, wall, cpu, tokens):
    """row plus the medians of wall and CPU seconds and the tokens/s of each."""
    row.update(seconds=statistics.median(wall), cpu_seconds=statistics.median(cpu),
               all_seconds=wall, all_cpu_seconds=cpu)
    row.update(tokens_per_s=tokens / row["seconds"], cpu_tokens_per_s=tokens / row["cpu_seconds"])
    return row


# --------------------------- decode: greedy and beam search, ours (cache, recompute) and Marian

def decode(args):
    """Tokens/s of decoding one batch: ours with the key/value cache, ours recomputing the whole
    prefix every step (greedy only), and Hugging Face's MarianMTModel.generate() with its cache,
    all from random weights of the same sizes. Every hypothesis decodes exactly L tokens (ours:
    min_len = max_len = L; Marian: min_new_tokens = max_new_tokens = L), so every row does the
    same work; tokens/s counts the B * L output tokens."""
    from translation.encdec import EncDecConfig, ReformerEncDec, beam_search, greedy_decode
    torch.manual_seed(0)
    C, nh, V, nl = args.d_model, args.n_heads, args.vocab_size, args.layers[0]
    cfg = EncDecConfig(vocab_size=V, n_layers=nl, n_dec_layers=nl, d_model=C, n_heads=nh,
                       d_ff=args.d_ff, dropout=0.0, reversible=bool(args.reversible))
    ours = ReformerEncDec(cfg).to(args.device).eval()
    marian = marian_model(args)
    src = torch.randint(3, V, (args.batch, args.src_len), device=args.device)
    rows = []
    for L in args.lengths:
        tokens = lambda hyps: sum(len(h) for h in hyps)
        runs = {"ours, greedy": lambda: tokens(greedy_decode(ours, src, L, min_len=L)),
                "ours, greedy, recompute": lambda: tokens(greedy_decode(
                    ours, src, L, use_cache=False, min_len=L)),
                f"ours, beam {args.beam_size}": lambda: tokens(beam_search(
                    ours, src, args.beam_size, 0.6, L, min_len=L))}
        if marian is not None:
            runs.update({"marian, greedy": lambda: marian_generate(marian, src, L, 1),
                         f"marian, beam {args.beam_size}": lambda: marian_generate(
                             marian, src, L, args.beam_size)})
        for name, fn in runs.items():   # every row decodes B x L tokens, none fewer
            n = fn()
            assert n == args.batch * L, (name, n)
        times = round_robin(list(runs.values()), args.repeats, 0, args.device)
        for name, (wall, cpu) in zip(runs, times):
            rows.append(timed_row(dict(impl=name, length=L, batch=args.batch), wall, cpu,
                                  args.batch * L))
            progress(f"{name} L={L}", rows[-1], f"{rows[-1]['tokens_per_s']:.0f} tokens/s, "
                     f"{rows[-1]['cpu_tokens_per_s']:.0f} per CPU s")
    _decode_ratios(rows, args.beam_size)
    # How far the cached greedy decode is from the memory floor: the bytes it must read over the
    # rate at which this machine streams them.
    rate = stream_rate(args.device)
    need = {L: decode_bytes(ours, args.batch, args.src_len, L) for L in args.lengths}
    for r in rows:
        if r["impl"] == "ours, greedy":
            r["floor_s"] = need[r["length"]] / rate
            r["of_floor"] = r["seconds"] / r["floor_s"]
    print(f"reading memory: {rate / 1e9:.1f} GB/s; cached greedy decoding must read "
          + ", ".join(f"{n / 2 ** 20:.0f} MB (at least {n / rate:.3f} s) at L = {L}"
                      for L, n in need.items()))
    title = (f"decode: tokens/s of decoding {args.batch} sentences of {args.src_len} source "
             f"tokens into exactly L target tokens each; {nl} + {nl} layers, d_model {C}, "
             f"{nh} heads, d_ff {args.d_ff}, vocab {V}, ours reversible={bool(args.reversible)},"
             f" {torch.get_num_threads()} threads, median of {args.repeats} in turns; 'x peer' "
             f"= our tokens/s over the row's (Marian's, or recompute's), wall clock and CPU")
    return report(args, "decode", title, rows, ["impl", "length", "batch", "seconds",
                                                "tokens_per_s", "vs_ours", "cpu_tokens_per_s",
                                                "vs_ours_cpu", "floor_s", "of_floor"],
                  dict(vocab_size=V, n_layers=nl, d_ff=args.d_ff, src_len=args.src_len,
                       beam_size=args.beam_size, reversible=bool(args.reversible),
                       threads=torch.get_num_threads(), stream_bytes_per_s=rate),
                  headers=dict(seconds=("s", "{:.3f}"), vs_ours=("x peer", "{:.2f}"),
                               cpu_tokens_per_s=("tokens/CPU s", "{:.0f}"),
                               vs_ours_cpu=("x peer (CPU)", "{:.2f}"),
                               floor_s=("memory floor s", "{:.3f}"),
                               of_floor=("x floor", "{:.2f}")))


def decode_bytes(model, batch, src_len, length):
    """Bytes that cached greedy decoding of `length` tokens for `batch` sentences must read, at
    the least: at every step, every decoder weight that a step uses (all but the cross-attention's
    kv projection, used once a sentence), the final LayerNorm and the output layer, each layer's
    cross-attention keys and values of the source (B, S, 2C), and its self-attention keys and
    values so far (B, t + 1, 2C). Each read once a step; the encoder, run once, is left out."""
    cfg, size = model.config, model.lm_head.weight.element_size()
    weights = sum(p.numel() for n, p in model.decoder.named_parameters() if ".cross.kv." not in n)
    n_layers = len(model._decoder_layers())
    weights += model.lm_head.weight.numel() + sum(p.numel() for p in model.ln_f.parameters())
    per_step = weights + n_layers * 2 * batch * src_len * cfg.d_model
    keys = n_layers * 2 * batch * cfg.d_model * sum(t + 1 for t in range(length))
    return (length * per_step + keys) * size


def _decode_ratios(rows, k):
    """On each peer row (Marian's, ours recomputing): vs_ours = our cached tokens/s over the
    row's, for the same search and length (> 1: ours is faster); vs_ours_cpu the same per CPU
    second."""
    for value, out in (("tokens_per_s", "vs_ours"), ("cpu_tokens_per_s", "vs_ours_cpu")):
        ours = {(r["impl"].split(", ", 1)[1], r["length"]): r[value] for r in rows
                if r["impl"] in ("ours, greedy", f"ours, beam {k}")}
        for r in rows:
            search = "greedy" if "greedy" in r["impl"] else f"beam {k}"
            if r["impl"].startswith("marian") or "recompute" in r["impl"]:
                r[out] = ours[(search, r["length"])] / r[value]


def marian_model(args):
    """Hugging Face's MarianMTModel from a MarianConfig of our sizes, random weights, or None
    (with a message) when transformers is not installed or --no_peers."""
    if args.no_peers:
        return None
    try:
        from transformers import MarianConfig, MarianMTModel
    except ImportError:
        print("skipped: marian (transformers not installed: pip install -r "
              "requirements-bench.txt)")
        return None
    nl = args.layers[0]
    cfg = MarianConfig(vocab_size=args.vocab_size, d_model=args.d_model, encoder_layers=nl,
                       decoder_layers=nl, encoder_attention_heads=args.n_heads,
                       decoder_attention_heads=args.n_heads, encoder_ffn_dim=args.d_ff,
                       decoder_ffn_dim=args.d_ff, max_position_embeddings=512, dropout=0.0,
                       attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0,
                       eos_token_id=2, decoder_start_token_id=1, forced_eos_token_id=None)
    torch.manual_seed(0)
    return MarianMTModel(cfg).to(args.device).eval()


@torch.no_grad()
def marian_generate(model, src, L, beams):
    """generate() with its KV cache, exactly L new tokens per sentence; returns how many."""
    beam = dict(length_penalty=0.6, early_stopping=False) if beams > 1 else {}   # as ours
    out = model.generate(input_ids=src, attention_mask=src != 0, num_beams=beams,
                         do_sample=False, max_new_tokens=L, min_new_tokens=L, use_cache=True,
                         **beam)
    return (out.shape[1] - 1) * out.shape[0]   # without the decoder start token


# ------------------------------------------------------------------------------------ command line

COMMANDS = {"speed": speed, "memory-depth": memory_depth, "memory-hashes": memory_hashes,
            "throughput": throughput, "profile": profile,
            "translation-step": translation_step, "decode": decode}


def ints(s):
    return [int(v) for v in s.split(",") if v.strip()]


def sizes_text(table):
    """'  speed          lengths 1024,2048, n_hashes 1,2' etc., one line per sub-command."""
    text = lambda v: ",".join(map(str, v)) if isinstance(v, list) else str(v)
    return "\n".join(f"  {name:<14} " + ", ".join(f"{k} {text(v)}" for k, v in d.items())
                     for name, d in table.items())


def get_parser():
    parser = argparse.ArgumentParser(
        description="Reformer benchmarks: speed (paper Figure 5), memory, throughput, against "
                    "reformer-pytorch and transformers when installed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"default sizes:\n{sizes_text(DEFAULTS)}\n  (on CUDA speed adds length 32768)\n"
               f"`all` (the default) on a CPU overrides them with:\n{sizes_text(ALL_CPU)}")
    common = argparse.ArgumentParser(add_help=False)
    # --- what is measured
    common.add_argument("--lengths", type=ints, default=None,
                        help="sequence lengths, comma-separated (default: per sub-command)")
    common.add_argument("--tokens", type=int, default=None,
                        help="tokens per step: batch = tokens // length (paper Figure 5 holds "
                             "it fixed; the paper used 32768; default 16384, translation-step "
                             "4096 padded source tokens)")
    common.add_argument("--n_hashes", type=ints, default=None,
                        help="LSH rounds, comma-separated; memory-depth and throughput use the "
                             "first (default: per sub-command)")
    common.add_argument("--layers", type=ints, default=None,
                        help="model depths for memory-depth and throughput (paper Table 3, n_l)")
    common.add_argument("--max_full_len", type=int, default=8192,
                        help="longest length for our full attention, which materialises "
                             "(B*nh, T, T) logits (16K: 4 GB per copy)")
    common.add_argument("--dedup", action="store_true",
                        help="speed: add ours-dedup rows (dedup=True, a key found in several rounds "
                             "counted once; lsh_attention.py step 6), 'x ours' = their cost")
    common.add_argument("--no_peers", action="store_true",
                        help="skip reformer-pytorch and transformers even when installed")
    # --- the layer
    common.add_argument("--d_model", type=int, default=256, help="model width C")
    common.add_argument("--n_heads", type=int, default=4, help="attention heads nh")
    common.add_argument("--bucket_size", type=int, default=64,
                        help="LSH chunk length m; n_buckets = length // bucket_size")
    common.add_argument("--d_ff", type=int, default=1024,
                        help="feed-forward width of the models (memory-depth, throughput)")
    # --- how it is run
    common.add_argument("--repeats", type=int, default=3, help="timed steps; the median counts")
    common.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    common.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                        help="parameter and activation dtype (logits stay fp32 in ours)")
    common.add_argument("--compile", action="store_true",
                        help="torch.compile our layers (peers stay eager); compile time excluded")
    common.add_argument("--reuse_memory", action="store_true",
                        help="glibc only: keep freed memory for reuse instead of mapping every "
                             "tensor above 32 MB afresh (mallopt M_MMAP_THRESHOLD and "
                             "M_TRIM_THRESHOLD = 1 GB), for every implementation in the process "
                             "(speed, throughput, profile; memory rows run in their own processes)")
    common.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice)")
    common.add_argument("--out", default="experiments/bench_results", help="folder for the JSON and PNG")
    common.add_argument("--top", type=int, default=15, help="profile: how many ops to list")
    sub = parser.add_subparsers(dest="command", metavar="{all,speed,memory-depth,memory-hashes,"
                                                        "throughput,profile,translation-step,"
                                                        "decode}")
    helps = {"all": "the CPU-sized suite of the four below (the default)",
             "speed": "seconds per step of one layer vs length, ours/SDPA/peers, FLOP/s",
             "memory-depth": "peak memory of a ReformerLM training step vs depth, reversible, "
                             "ff_chunks",
             "memory-hashes": "peak memory of the LSH layer vs n_hashes and length, with peers",
             "throughput": "whole-model training tokens/s, ours vs reformer-pytorch",
             "profile": "torch.profiler top ops of one step of our LSH layer",
             "translation-step": "a training step of our encoder-decoder beside nn.Transformer",
             "decode": "decoding tokens/s: ours cached, ours recomputing, MarianMTModel"}
    subs = {name: sub.add_parser(name, parents=[common], help=text, description=text)
            for name, text in helps.items()}
    for name in ("translation-step", "decode"):
        subs[name].add_argument("--vocab_size", type=int, default=8000,
                                help="joint vocabulary V of the translation models")
    d = subs["decode"]
    d.add_argument("--batch", type=int, default=16, help="sentences decoded together B")
    d.add_argument("--src_len", type=int, default=32, help="source tokens per sentence S")
    d.add_argument("--beam_size", type=int, default=4, help="beam width k of the beam rows")
    d.add_argument("--reversible", type=int, default=1, help="ours reversible (1) or not (0)")
    return parser


def resolve(args, command, suite=False):
    """A copy of args with the per-command default sizes filled in."""
    a = argparse.Namespace(**vars(args))
    defaults = dict(DEFAULTS[command])
    if suite and not a.device.startswith("cuda"):
        defaults.update(ALL_CPU.get(command, {}))
    defaults.setdefault("tokens", 16384)
    if a.device.startswith("cuda"):
        defaults["lengths"] = defaults["lengths"] + CUDA_EXTRA_LENGTHS.get(command, [])
    for key, value in defaults.items():
        if getattr(a, key, None) is None:
            setattr(a, key, value)
    return a


def reuse_freed_memory():
    """On a CPU every tensor comes from malloc, and glibc maps each block above its mmap threshold
    (at most 32 MB) afresh and unmaps it on free, so every large tensor of every step is
    page-faulted in again. Raising the thresholds makes glibc keep and reuse that memory."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        ok = False
    if not ok:
        raise SystemExit("--reuse_memory: mallopt is not available (it needs glibc)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_mem_worker"]:   # internal: one memory measurement in a fresh process
        spec = json.loads(argv[argv.index("--json") + 1])
        print(json.dumps(mem_worker(spec)))
        return
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["all"] + argv   # no sub-command: the suite
    args = get_parser().parse_args(argv)
    args.code = code_version()   # now: the model files were imported a moment ago
    args.load_at_start = list(os.getloadavg())
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.reuse_memory:
        reuse_freed_memory()
    print(f"{device_name(args.device)}, torch {torch.__version__}, load average "
          f"{os.getloadavg()[0]:.2f}")
    t0 = time.time()
    if args.command == "all":
        for name in ("speed", "memory-depth", "memory-hashes", "throughput"):
            print(f"\n=== {name} ===")
            COMMANDS[name](resolve(args, name, suite=True))
    else:
        COMMANDS[args.command](resolve(args, args.command))
    print(f"\ndone in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
