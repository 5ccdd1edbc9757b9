"""Smoke tests for bench.py: every sub-command runs at a tiny size and writes its JSON (and its
PNG, translation-step and decode excepted), so the benchmark script cannot rot; and the FLOP count behind the speed table's FLOP/s column
equals what PyTorch's own FLOP counter sees in one forward+backward of our LSH layer.
The peers (reformer-pytorch, transformers) are not needed: rows for them appear only when they
are installed, and the memory sub-commands here run with --no_peers to stay fast.

Run: python -m pytest tests/test_bench.py        (about 30 s on two CPU cores)
"""
import argparse
import json
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench

TINY = ["--d_model", "32", "--n_heads", "2", "--bucket_size", "16", "--d_ff", "64",
        "--repeats", "1", "--threads", "1"]


def run_json(tmp_path, *argv):
    """bench.main at the TINY sizes; the rows of the JSON it wrote (no plot)."""
    bench.main([*argv, *TINY, "--out", str(tmp_path)])
    with open(tmp_path / f"{argv[0]}.json") as f:
        record = json.load(f)
    assert record["command"] == argv[0] and record["torch"] == torch.__version__
    return record["rows"]


def run(tmp_path, *argv):
    """run_json, and the plot it drew."""
    rows = run_json(tmp_path, *argv)
    if argv[0] != "profile":   # profile prints its table of ops and draws nothing
        assert (tmp_path / f"{argv[0]}.png").stat().st_size > 0
    return rows


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()   # bench.main sets --threads for the whole process
    yield
    torch.set_num_threads(n)


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("all", "speed", "memory-depth", "memory-hashes", "throughput", "profile",
                 "translation-step", "decode"):
        assert name in out


def test_speed(tmp_path):
    rows = run(tmp_path, "speed", "--lengths", "64,128", "--tokens", "128", "--n_hashes", "1,2")
    ours = [r for r in rows if r["impl"] == "ours"]
    assert len(ours) == 4 and all(r["seconds"] > 0 and r["gflop"] > 0 for r in ours)
    assert all(0 < r["matmul_fraction"] for r in ours)
    reference = [r for r in rows if r["impl"] == "ours-reference"]   # Part 1, timed beside
    assert len(reference) == 4 and all(r["seconds"] > 0 and r["vs_ours"] > 0 for r in reference)
    for impl in ("ours-full", "sdpa"):
        assert [r["length"] for r in rows if r["impl"] == impl and "seconds" in r] == [64, 128]
    for r in rows:   # peers, if installed, ran and were compared with ours
        if r["impl"] in bench.PEERS:
            assert "error" in r or r["vs_ours"] > 0


def test_speed_with_reused_memory_writes_its_own_record(tmp_path):
    bench.main(["speed", "--reuse_memory", "--lengths", "64", "--tokens", "64", "--n_hashes", "1",
                "--no_peers", "--max_full_len", "32", *TINY, "--out", str(tmp_path)])
    with open(tmp_path / "speed-reuse.json") as f:
        record = json.load(f)
    assert record["reuse_memory"]
    assert [r["impl"] for r in record["rows"]] == ["ours", "ours-reference", "sdpa"]


def test_speed_skips_full_attention_beyond_max_full_len(tmp_path):
    rows = run(tmp_path, "speed", "--lengths", "64", "--tokens", "64", "--n_hashes", "1",
               "--max_full_len", "32", "--no_peers")
    assert [r["impl"] for r in rows] == ["ours", "ours-reference", "sdpa"]


def test_memory_hashes(tmp_path):
    rows = run(tmp_path, "memory-hashes", "--lengths", "64", "--tokens", "64", "--n_hashes", "2",
               "--no_peers")
    assert len(rows) == 1 and "error" not in rows[0], rows
    assert rows[0]["peak_mb"] >= rows[0]["baseline_mb"] > 0 and rows[0]["logits_mb"] > 0


def test_memory_depth(tmp_path):
    rows = run(tmp_path, "memory-depth", "--lengths", "64", "--layers", "1", "--n_hashes", "1")
    assert len(rows) == 4 and all("error" not in r for r in rows), rows
    assert {(r["reversible"], r["ff_chunks"]) for r in rows} == {(False, 1), (False, 8),
                                                                  (True, 1), (True, 8)}


def test_throughput(tmp_path):
    rows = run(tmp_path, "throughput", "--lengths", "64", "--tokens", "128", "--layers", "1",
               "--n_hashes", "1")
    ours = next(r for r in rows if r["impl"] == "ours")
    assert ours["tokens_per_s"] > 0 and ours["batch"] == 2


def test_profile(tmp_path):
    rows = run(tmp_path, "profile", "--lengths", "64", "--tokens", "64", "--n_hashes", "1",
               "--top", "3")
    assert len(rows[0]["top"]) == 3 and rows[0]["total_ms"] > 0


def test_mem_worker_reports_a_failure_instead_of_crashing():
    spec = bench.base_spec(argparse.Namespace(device="cpu", dtype="fp32", threads=1, d_model=32,
                                              n_heads=2, bucket_size=16, d_ff=64),
                           kind="layer", impl="no-such-layer", n_hashes=1, length=64, batch=1)
    assert "error" in bench.measure_memory(spec)


@pytest.mark.parametrize("B, T, n_hashes", [(2, 64, 1), (1, 128, 4), (3, 64, 2)])
def test_lsh_flops_match_pytorch_flop_counter(B, T, n_hashes):
    args = argparse.Namespace(d_model=32, n_heads=2, bucket_size=16, dtype="fp32", device="cpu")
    step = bench.layer_step(bench.build_layer("ours", n_hashes, T, args), B, T, args)
    # The causal logits come from an in-place baddbmm_, which the counter has no formula for.
    def baddbmm_(bias_shape, a_shape, b_shape, *args, **kwargs):
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.baddbmm_: baddbmm_}) \
            as counter:
        step()
    assert counter.get_total_flops() == bench.lsh_flops(B, T, 32, 2, 16, n_hashes)


def test_speed_dedup_rows_time_dedup_beside_ours(tmp_path):
    bench.main(["speed", "--dedup", "--lengths", "64", "--tokens", "64", "--n_hashes", "1,2",
                "--no_peers", "--max_full_len", "32", *TINY, "--out", str(tmp_path)])
    with open(tmp_path / "speed-dedup.json") as f:
        rows = json.load(f)["rows"]
    dedup = [r for r in rows if r["impl"] == "ours-dedup"]
    assert [r["n_hashes"] for r in dedup] == [2]   # one round has nothing to deduplicate
    assert dedup[0]["seconds"] > 0 and dedup[0]["vs_ours"] > 0


def test_translation_step_times_ours_beside_nn_transformer(tmp_path):
    rows = run_json(tmp_path, "translation-step", "--vocab_size", "50", "--tokens", "64",
                    "--lengths", "16", "--layers", "1")
    impls = {(r["impl"], r["reversible"], r["dropout"]) for r in rows}
    for dropout in (0.1, 0.0):
        assert ("nn.Transformer", False, dropout) in impls
        for variant in bench.TRANSLATION_VARIANTS:
            assert {(variant, True, dropout), (variant, False, dropout)} <= impls
    assert all(r["cpu_seconds"] > 0 and r["vs_torch"] > 0 for r in rows)
    assert all(r["vs_ours"] > 0 for r in rows if r["impl"] != "ours")


def test_decode_forces_every_row_to_the_same_length(tmp_path):
    """Ours cached, ours recomputing and (when transformers is installed) Marian each decode
    exactly batch x L tokens, and the ratios are on the peer rows."""
    rows = run_json(tmp_path, "decode", "--vocab_size", "50", "--lengths", "5", "--batch", "2",
                    "--src_len", "4", "--beam_size", "2", "--layers", "1")
    names = [r["impl"] for r in rows]
    assert names[:3] == ["ours, greedy", "ours, greedy, recompute", "ours, beam 2"]
    assert all(r["tokens_per_s"] > 0 and r["cpu_tokens_per_s"] > 0 for r in rows)
    peers = [r for r in rows if r["impl"] not in ("ours, greedy", "ours, beam 2")]
    assert peers and all(r["vs_ours"] > 0 and r["vs_ours_cpu"] > 0 for r in peers)
    if bench.peer_version("transformers"):
        assert names[3:] == ["marian, greedy", "marian, beam 2"]


@pytest.mark.parametrize("reversible", [True, False])
def test_decode_bytes_count_what_a_cached_step_reads(reversible):
    """decode_bytes (the memory floor of bench.py decode) at one step equals the bytes of the
    tensors a cached step reads, listed from start_cache: so it counts no weight a step skips (the
    cross-attention's kv projection) and misses none it reads. Each further step adds the keys
    and values of one more position."""
    from translation.encdec import EncDecConfig, ReformerEncDec
    cfg = EncDecConfig(vocab_size=50, n_layers=2, n_dec_layers=2, d_model=16, n_heads=2,
                       d_ff=24, dropout=0.0, reversible=reversible)
    model = ReformerEncDec(cfg).eval()
    B, S = 3, 5
    memory = torch.randn(B, S, cfg.d_model)
    cache = model.start_cache(memory, torch.ones(B, S, dtype=torch.bool), 1)
    read = cache["lm_head_t"].numel() + sum(p.numel() for p in model.ln_f.parameters())
    for layer in cache["layers"]:
        read += sum(layer[n].numel() for n in ("w_in", "w_out", "b_out", "w_q", "w_cross_out",
                                               "b_cross_out", "w1", "b1", "w2", "b2"))
        read += sum(p.numel() for n in ("ln_sa", "ln_cross", "ln_ff")
                    for p in layer[n].parameters())
        read += sum(m.numel() for m in layer["memory_kv"]) + 2 * B * cfg.d_model   # k, v at t 0
    assert bench.decode_bytes(model, B, S, 1) == 4 * read
    one_more = 4 * 2 * 2 * B * cfg.d_model            # 2 layers x (k, v) x B rows x C, float32
    assert bench.decode_bytes(model, B, S, 2) == 2 * bench.decode_bytes(model, B, S, 1) + one_more
