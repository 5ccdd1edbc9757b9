"""
Everything that needs a GPU, checked and measured in one call (about 8 minutes on one H200):

    python -m experiments.gpu_check                        # on a CUDA machine: logs + JSON under $OUT (or gpu_out/)
    python -m experiments.gpu_check --device cpu --tiny    # the rehearsal on a CPU: every step, tiny sizes
    python -m experiments.gpu_check --wheels               # beforehand, with network: the peers as wheels in .whl/

A GPU machine without network gets the peers (reformer-pytorch and what it needs) as wheels: run
`--wheels` where there is network, copy `.whl/` along, and this script installs them into /tmp/site
first. Until it has run, each GPU number is "not yet run on a GPU: python -m experiments.gpu_check".

The steps, each in its own subprocess with its own time limit (a failure is recorded, the next
step runs):
  1 tests     the CUDA cases of tests/test_cuda.py and tests/test_reversible.py: attention equal to
              the CPU references (values, gradcheck), reversible backward with CUDA RNG replay,
              bf16/fp16 autocast steps, a checkpoint saved on the device resumed on the CPU
  2 ceilings  the chip's two roofs: the bf16 and fp32 matmul rate and the device-to-device
              copy bandwidth, measured, not the datasheet's
  3 speed     bench.py speed in bf16 at 1K..64K tokens: ours LSH-1/2/4/8 and the readable
              reference, SDPA (FlashAttention on a GPU) and the peers
  4 compile   bench.py speed --compile: our layers under torch.compile, beside step 3 (eager)
  5 memory    bench.py memory-depth: the allocator's peak for 2 and 12 layers
  6 longest   the longest sequence a 12-layer reversible LSH ReformerLM trains on (one step,
              batch 1), doubling the length from 64K until the GPU runs out of memory
  7 train     a short train.py run in bf16 on the duplication task
Last it prints one short table (the end of the output is what a remote run shows) and writes
summary.json beside the steps' JSON.
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository root
PEERS = ["reformer-pytorch==1.4.4"]     # as requirements-bench.txt; transformers is on the device
ON_DEVICE = {"torch", "numpy", "packaging", "transformers", "triton", "typing-extensions",
             "filelock", "sympy", "networkx", "jinja2", "fsspec"}   # the device image has these

# Sizes: the GPU run, and the CPU rehearsal that goes through the same code in seconds.
SIZES = {
    "gpu":  dict(lengths="1024,4096,16384,65536", compile_lengths="4096", tokens=65536,
                 depth_length=16384, longest_from=65536, longest_to=2 ** 21, train_steps=200,
                 # at most 6.5 minutes in all, so a 15-minute slot leaves time to rerun what
                 # failed (--skip the rest)
                 limits=dict(tests=60, speed=120, compile=60, memory=45, longest=60, train=30)),
    "tiny": dict(lengths="256,512", compile_lengths="256", tokens=1024, depth_length=512,
                 longest_from=256, longest_to=1024, train_steps=20,
                 limits=dict(tests=300, speed=300, compile=300, memory=120, longest=120,
                             train=120)),
}


# ----------------------------------------------------------------------------- the chip's ceilings

def ceilings(device):
    """Measured matmul rates and copy bandwidth: the roofs the speed rows are set against."""
    from bench import device_name, matmul_rate, median_time
    n = 8192 if device.startswith("cuda") else 1024
    out = dict(device=device_name(device))
    for name in ("bf16", "fp32"):
        dtype = torch.bfloat16 if name == "bf16" else torch.float32
        out[f"matmul_{name}_tflop_per_s"] = matmul_rate(device, dtype, n=n, repeats=10) / 1e12
    elems = 2 ** 28 if device.startswith("cuda") else 2 ** 24          # 1 GB / 64 MB of fp32
    a = torch.randn(elems, device=device)
    b = torch.empty_like(a)
    t, _ = median_time(lambda: b.copy_(a), 10, 3, device)
    out["copy_gb_per_s"] = 2 * a.numel() * a.element_size() / t / 1e9  # bytes read + written
    return out


# ----------------------------------------------------------- the longest trainable sequence length

def longest(device, dtype, start, stop, layers=12, n_hashes=2):
    """One training step (forward + backward, batch 1) of a 12-layer reversible LSH ReformerLM at
    start, 2 start, 4 start, ... until one fails (out of memory) or stop is passed."""
    from bench import error_text, lm_step
    rows, T = [], start
    while T <= stop:
        spec = dict(impl="ours", length=T, batch=1, n_layers=layers, n_hashes=n_hashes,
                    d_model=256, n_heads=4, bucket_size=64, d_ff=1024, reversible=True,
                    ff_chunks=16, device=device)
        row = dict(length=T, n_layers=layers, n_hashes=n_hashes, dtype=dtype)
        try:
            model, step = lm_step(spec)
            ctx = torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype),
                                 enabled=dtype != "float32")
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            with ctx:
                step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                row["peak_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
            row["seconds"] = time.perf_counter() - t0
        except (torch.cuda.OutOfMemoryError, RuntimeError, MemoryError) as e:
            row["error"] = error_text(e)
        model = step = None
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
        if "error" in row:
            break
        T *= 2
    return summarize_longest(rows)


# --------------------------------------------------------------------------------- the steps

def install_wheels(folder):
    """Install carried wheels into /tmp/site for this process and the steps' subprocesses."""
    if not os.path.isdir(folder) or not os.listdir(folder):
        return
    site = "/tmp/site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-compile", "--no-cache-dir", "--upgrade", "--target", site,
                    *[os.path.join(folder, f) for f in os.listdir(folder)]], check=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, site)


def collect(work, final):
    """Copy into final the JSON and one archive of everything: few files, for a remote run that
    brings back only a handful."""
    import shutil
    import tarfile
    os.makedirs(final, exist_ok=True)
    for name in ("summary.json", "speed.json", "speed-compile.json", "memory-depth.json"):
        if os.path.exists(os.path.join(work, name)):
            shutil.copy(os.path.join(work, name), final)
    with tarfile.open(os.path.join(final, "gpu_check.tar.gz"), "w:gz") as tar:
        for name in sorted(os.listdir(work)):
            if name != "train":   # the checkpoint stays behind; its log.jsonl comes along
                tar.add(os.path.join(work, name), arcname=name)
        if os.path.exists(os.path.join(work, "train", "log.jsonl")):
            tar.add(os.path.join(work, "train", "log.jsonl"), arcname="train-log.jsonl")


def download_wheels(folder):
    """The peers and, recursively, what they require, as wheels, leaving out what the device
    image already has (torch above all: pip would fetch a CUDA build of several GB)."""
    import re
    import zipfile
    todo, seen = list(PEERS), set(ON_DEVICE)
    while todo:
        req = todo.pop()
        name = re.split(r"[<>=!~ ;(\[]", req)[0].lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary=:all:", "-d", folder, req], check=True)
        wheel = next(f for f in os.listdir(folder)
                     if f.lower().replace("_", "-").startswith(name + "-"))
        meta = zipfile.ZipFile(os.path.join(folder, wheel))
        text = meta.read(next(n for n in meta.namelist() if n.endswith(".dist-info/METADATA")))
        todo += [line.split(":", 1)[1].strip() for line in text.decode().splitlines()
                 if line.startswith("Requires-Dist:") and "extra ==" not in line]
    print(f"wheels in {folder}: " + ", ".join(sorted(os.listdir(folder))))


def run_step(name, cmd, limit, out, results):
    """Run cmd with a time limit, its output into out/name.log; record rc and seconds."""
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    with open(os.path.join(out, f"{name}.log"), "w") as log:
        try:
            p = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=limit,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    results[name] = dict(rc=rc, seconds=round(time.time() - t0, 1), command=" ".join(cmd))
    with open(os.path.join(out, f"{name}.log")) as log:
        tail = log.read().strip().splitlines()[-3:]
    print(f"{name}: rc {rc} in {results[name]['seconds']} s | " + " | ".join(tail), flush=True)


def read_longest(log_path):
    """The rows the longest-length search printed (one JSON line each), as longest() returns."""
    rows = []
    for line in open(log_path):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "length" in row:
            rows.append(row)
    return summarize_longest(rows)


def summarize_longest(rows):
    ok = [r["length"] for r in rows if "error" not in r]
    return dict(rows=rows, longest=max(ok) if ok else None,
                reached_limit=bool(rows) and "error" not in rows[-1])


def load(out, name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else {}


def summary(out, results):
    """One short table: each step's status, then ours against SDPA and the peers per length, the
    compiled speed-up, memory against depth, the longest length, and the rates against the roofs."""
    roofs = results.get("ceilings", {})
    lines = ["step       rc       s"] + [f"{k:<10} {str(v.get('rc', '-')):<8} {v.get('seconds', '')}"
                                        for k, v in results.items() if isinstance(v, dict) and "rc" in v]
    speed = load(out, "speed.json").get("rows", [])
    sec = {(r["impl"], r["n_hashes"], r["length"]): r["seconds"] for r in speed if "seconds" in r}
    lengths = sorted({r["length"] for r in speed})
    impls = sorted({(r["impl"], r["n_hashes"]) for r in speed if "seconds" in r},
                   key=lambda k: (k[0] != "ours", k[0], k[1] or 0))
    if lengths:
        lines.append("seconds per fwd+bwd (bf16)  " + "  ".join(f"{T:>8}" for T in lengths))
        for impl, h in impls:
            cells = [sec.get((impl, h, T)) for T in lengths]
            lines.append(f"{impl + (f' LSH-{h}' if h else ''):<27} " +
                         "  ".join(f"{c:8.4f}" if c else f"{'-':>8}" for c in cells))
        for r in speed:
            if r["impl"] == "ours" and "gflop_per_s" in r and r["length"] == lengths[-1]:
                frac = r["gflop_per_s"] / 1e3 / roofs.get("matmul_bf16_tflop_per_s", float("nan"))
                lines.append(f"ours LSH-{r['n_hashes']} at {r['length']}: "
                             f"{r['gflop_per_s'] / 1e3:.3g} TFLOP/s = {frac:.1%} of bf16 matmul")
    compiled = load(out, "speed-compile.json").get("rows", [])
    for r in compiled:
        eager = sec.get(("ours", r["n_hashes"], r["length"]))
        if r["impl"].startswith("ours (") and "seconds" in r and eager:
            lines.append(f"compile: LSH-{r['n_hashes']} at {r['length']}: "
                         f"{eager / r['seconds']:.2f}x eager")
    for r in load(out, "memory-depth.json").get("rows", []):
        if "vs_fewest_layers" in r and r["n_layers"] == max(x["n_layers"] for x in
                                                             load(out, "memory-depth.json")["rows"]):
            lines.append(f"memory: {r['n_layers']} layers reversible={r['reversible']} "
                         f"ff_chunks={r['ff_chunks']}: {r['vs_fewest_layers']:.2f}x 2 layers")
    lng = results.get("longest", {})
    if lng.get("rows"):
        last_ok = [r for r in lng["rows"] if "error" not in r]
        lines.append(f"longest 12-layer LSH-2 training step: {lng['longest']} tokens" +
                     (f" ({last_ok[-1]['seconds']:.1f} s, {last_ok[-1].get('peak_gb', 0):.0f} GB)"
                      if last_ok else "") + (" (stopped at the search's limit)"
                                             if lng.get("reached_limit") else ""))
    if roofs:
        lines.append(f"roofs: bf16 matmul {roofs['matmul_bf16_tflop_per_s']:.3g} TFLOP/s, "
                     f"fp32 {roofs['matmul_fp32_tflop_per_s']:.3g}, copy "
                     f"{roofs['copy_gb_per_s']:.0f} GB/s")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (the run) or cpu (the rehearsal)")
    p.add_argument("--tiny", action="store_true", help="the rehearsal's tiny sizes")
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_out"),
                   help="logs and JSON (default: $OUT, else gpu_out/)")
    p.add_argument("--wheels", action="store_true",
                   help="download the peers' wheels into .whl/ for the device (needs network)")
    p.add_argument("--skip", default="", help="steps to leave out, comma-separated")
    p.add_argument("--_longest", nargs=4, metavar=("DEVICE", "DTYPE", "FROM", "TO"),
                   help=argparse.SUPPRESS)   # internal: step 6 in its own process
    args = p.parse_args(argv)
    if args._longest:
        device, dtype, lo, hi = args._longest
        print(json.dumps(longest(device, dtype, int(lo), int(hi))))
        return
    if args.wheels:
        download_wheels(os.path.join(ROOT, ".whl"))
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: --device=cuda but torch sees no CUDA device "
                         "(use --device cpu --tiny for the rehearsal)")
    install_wheels(os.path.join(ROOT, ".whl"))
    # The steps write into a work folder; collect() copies the JSON and one archive into final.
    final = args.out
    args.out = os.path.join(final, "work") if final == "gpu_out" else "/tmp/gpu_check"
    os.makedirs(args.out, exist_ok=True)
    size = SIZES["tiny" if args.tiny else "gpu"]
    lim, py, skip = size["limits"], sys.executable, set(args.skip.split(","))
    dtype = "bf16"
    bench = [py, "bench.py", "--device", args.device, "--dtype", dtype, "--out", args.out]
    results = {}
    steps = {
        "tests": [py, "-m", "pytest", "-q", "tests/test_cuda.py", "tests/test_reversible.py",
                  "tests/test_gpu_check.py", "-m",
                  "cuda" if args.device.startswith("cuda") else "not cuda"],
        "speed": bench[:2] + ["speed"] + bench[2:] + ["--lengths", size["lengths"], "--tokens",
                                                      str(size["tokens"]), "--n_hashes", "1,2,4,8"],
        "compile": bench[:2] + ["speed"] + bench[2:] + ["--compile", "--lengths",
                                                        size["compile_lengths"], "--tokens",
                                                        str(size["tokens"]), "--n_hashes", "2",
                                                        "--no_peers"],
        "memory": bench[:2] + ["memory-depth"] + bench[2:] + ["--lengths",
                                                              str(size["depth_length"]),
                                                              "--layers", "2,12"],
        "longest": [py, "-m", "experiments.gpu_check", "--_longest", args.device, "bfloat16",
                    str(size["longest_from"]), str(size["longest_to"])],
        "train": [py, "train.py", "--device", args.device, "--precision", dtype, "--max_steps",
                  str(size["train_steps"]), "--eval_interval", str(size["train_steps"] // 2),
                  "--out_dir", os.path.join(args.out, "train"), "--log_interval", "10"],
    }
    t0 = time.time()
    if "tests" not in skip:
        run_step("tests", steps.pop("tests"), lim["tests"], args.out, results)
    else:
        steps.pop("tests")
    try:
        results["ceilings"] = ceilings(args.device)
    except Exception as e:   # the rest still runs, and collect() still brings everything back
        results["ceilings"] = dict(error=f"{type(e).__name__}: {e}")
    print("ceilings:", json.dumps(results["ceilings"]), flush=True)
    for name, cmd in steps.items():
        if name in skip:
            continue
        run_step(name, cmd, lim[name], args.out, results)
        if name == "longest":   # every row it printed, also when it ran out of time
            results["longest"].update(read_longest(os.path.join(args.out, "longest.log")))
    results["total_seconds"] = round(time.time() - t0, 1)
    json.dump(results, open(os.path.join(args.out, "summary.json"), "w"), indent=1)
    collect(args.out, final)
    print("\n" + "\n".join(summary(args.out, results)))
    print(f"total {results['total_seconds']} s; JSON in {final}/, logs in {final}/gpu_check.tar.gz")


if __name__ == "__main__":
    main()
