"""Tests for compare_translation.py: the nn.Transformer baseline decodes through encdec's beam
search exactly as its full forward pass predicts, and the side-by-side run gives each model its
budget and writes the results file.

    python -m pytest tests/test_compare_translation.py -q        (a few seconds)
"""
import json

import torch

import translation.compare_translation as ct
from translation.encdec import BOS, EncDecConfig, beam_search, greedy_decode

CFG = dict(vocab_size=20, max_seq_len=32, n_layers=1, n_dec_layers=2, d_model=16, n_heads=2,
           d_ff=32, dropout=0.0)


def test_baseline_step_equals_forward_and_greedy_equals_beam_one():
    torch.manual_seed(0)
    model = ct.TorchTransformerMT(EncDecConfig(**CFG)).eval()
    src = torch.randint(3, 20, (3, 6))
    src[1, 4:] = 0
    tgt_in = torch.randint(3, 20, (3, 5))
    tgt_in[:, 0] = BOS
    with torch.no_grad():
        want = model(src, tgt_in)[0]                                       # (B, T, V)
        memory, mask = model.encode(src)
        cache = model.start_cache(memory, mask, 5)
        got = torch.stack([model.step(tgt_in[:, t], t, cache) for t in range(5)], dim=1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert greedy_decode(model, src, max_len=8) == beam_search(model, src, 1, max_len=8)


def test_side_by_side_run_writes_results(tmp_path):
    corpus = tmp_path / "c.tsv"
    corpus.write_text("".join(f"the {w} house {i}\tdas {w} Haus {i}\n" for i in range(30)
                              for w in ("red", "big", "old")), encoding="utf-8")
    out = tmp_path / "r.json"
    results = ct.main([f"--data_path={corpus}", f"--data_dir={tmp_path}", "--budget_s=0.5",
                       "--heldout=5", "--vocab_size=400", "--layers=1", "--d_model=16",
                       "--n_heads=2", "--d_ff=32", "--max_tokens=200", "--beam_size=2",
                       "--log_interval=1", f"--out={out}"])
    saved = json.load(open(out))
    assert set(saved["models"]) == {"reformer", "transformer"} == set(results["models"])
    for r in saved["models"].values():
        assert r["steps"] >= 1 and r["train_seconds"] >= 0.5 and 0 <= r["bleu"] <= 100
        assert r["n_sentences"] == 5 and r["log"][0]["step"] == 1
