"""Tests for compare_translation.py: the nn.Transformer baseline decodes through encdec's beam
search exactly as its full forward pass predicts; given the same weights (Q/K/V biases zero) ours
without reversible layers computes what it computes; --init gives both models the same parameter
std per kind; the side-by-side run trains three rows (one not reversible) and writes both curves;
the --gap runs resume and tabulate.

    python -m pytest tests/test_compare_translation.py -q        (a few seconds)
"""
import json

import numpy as np
import pytest
import torch

import experiments.report as report
import translation.compare_translation as ct
from reversible import ReversibleSequence
from translation.encdec import BOS, EncDecConfig, ReformerEncDec, beam_search, greedy_decode

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


def copy_weights(theirs, ours):
    """nn.Transformer's weights into ours (not reversible), layer by layer; Q/K/V biases must be
    zero (ours has none)."""
    def linear(dst, w, b=None):
        dst.weight.copy_(w)
        if b is not None:
            dst.bias.copy_(b)

    def attention(mha, q, k, v, out):
        assert not mha.in_proj_bias.any()
        wq, wk, wv = mha.in_proj_weight.chunk(3)
        for dst, w in zip((q, k, v), (wq, wk, wv)):
            if dst is not None:
                linear(dst, w)
        linear(out, mha.out_proj.weight, mha.out_proj.bias)
        return wk, wv

    def norm(dst, src):
        linear(dst, src.weight, src.bias)

    def ff(dst, layer):
        linear(dst.w1, layer.linear1.weight, layer.linear1.bias)
        linear(dst.w2, layer.linear2.weight, layer.linear2.bias)

    t = theirs.transformer
    with torch.no_grad():
        ours.src_emb.weight.copy_(theirs.emb.weight)
        ours.pos_emb.emb.weight.copy_(theirs.pos_emb.emb.weight)
        for mine, layer in zip(ours.encoder, t.encoder.layers):
            a = mine.f.attn
            attention(layer.self_attn, a.qk, a.k, a.v, a.out)
            norm(mine.f.ln, layer.norm1), norm(mine.g.ln, layer.norm2), ff(mine.g.ff, layer)
        norm(ours.ln_enc, t.encoder.norm)
        for mine, layer in zip(ours.decoder, t.decoder.layers):
            a, cross = mine.f.self_attn.attn, mine.f.cross
            attention(layer.self_attn, a.qk, a.k, a.v, a.out)
            wk, wv = attention(layer.multihead_attn, cross.q, None, None, cross.out)
            cross.kv.weight.copy_(torch.cat([wk, wv]))
            norm(mine.f.self_attn.ln, layer.norm1), norm(mine.f.ln, layer.norm2)
            norm(mine.g.ln, layer.norm3), ff(mine.g.ff, layer)
        norm(ours.ln_f, t.decoder.norm)


def test_ours_not_reversible_equals_transformer_with_its_weights():
    """So the per-step gap has no architectural cause beyond the Q/K/V biases: positions,
    pre-LayerNorm, the final norms, cross-attention, GELU and the tied output layer agree."""
    cfg = EncDecConfig(**{**CFG, "reversible": False, "shared_qk": False})
    theirs = ct.build_model("transformer", cfg, "each_own", 0, qkv_bias=False).eval()
    with torch.no_grad():     # LayerNorms and biases away from 1 and 0, so each copy matters
        for name, p in theirs.named_parameters():
            if "in_proj_bias" not in name:
                p.add_(0.1 * torch.randn_like(p))
    ours = ct.build_model("ours", cfg, "ours", 1).eval()
    copy_weights(theirs, ours)
    src = torch.randint(3, 20, (3, 7))
    src[0, 5:] = 0
    tgt_in = torch.randint(3, 20, (3, 6))
    targets = torch.randint(3, 20, (3, 6))
    with torch.no_grad():
        want, want_loss = theirs(src, tgt_in, targets)
        got, got_loss = ours(src, tgt_in, targets)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=1e-5)


def stds(model):
    """Parameter std per kind: attention input projections, other matrices, embeddings."""
    proj = {id(w) for w in ct.attention_in_projections(model)}
    kinds = {"in_proj": [], "matrix": [], "embedding": []}
    for name, p in model.named_parameters():
        if p.dim() == 2:
            kind = "in_proj" if id(p) in proj else "embedding" if "emb" in name else "matrix"
            kinds[kind].append(p.detach().flatten())
    return {k: float(torch.cat(v).std()) for k, v in kinds.items()}


@pytest.mark.parametrize("init, want_ours, want_theirs", [
    ("ours", 0.02, 0.02), ("xavier_attn", 64 ** -0.5, 64 ** -0.5),
    ("each_own", 64 ** -0.5, 64 ** -0.5)])   # as built: ours by attn_init, xavier by default
def test_init_gives_both_models_the_same_std_per_kind(init, want_ours, want_theirs):
    cfg = EncDecConfig(**{**CFG, "d_model": 32, "d_ff": 64, "vocab_size": 200})  # sqrt(1/2C)
    ours = stds(ct.build_model("ours", cfg, init, 0))
    theirs = stds(ct.build_model("transformer", cfg, init, 0))
    assert ours["in_proj"] == pytest.approx(want_ours, rel=0.1)
    assert theirs["in_proj"] == pytest.approx(want_theirs, rel=0.1)
    for kind in ("matrix", "embedding"):
        assert ours[kind] == pytest.approx(0.02, rel=0.1) == theirs[kind]
    with pytest.raises(ValueError, match="init='xavier'"):
        ct.initialise(ct.TorchTransformerMT(cfg), "xavier")


def test_dropped_qkv_biases_stay_zero_while_the_rest_learns():
    model = ct.build_model("transformer", EncDecConfig(**CFG), "ours", 0, qkv_bias=False)
    args = type("A", (), dict(lr=1e-2, max_seq_len=8, seed=0, budget_s=60, max_tokens=32,
                              warmup=1, log_interval=1, print_interval=1))
    data = [(np.array([5, 6, 7, 2]), np.array([8, 9, 2]))] * 8
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ct.train_side_by_side({"t": model}, data, args, max_steps=2)
    for n, p in model.named_parameters():
        assert (p == 0).all() if "in_proj_bias" in n else not torch.equal(p, before[n]), n


def corpus(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_text("".join(f"the {w} house {i}\tdas {w} Haus {i}\n" for i in range(30)
                            for w in ("red", "big", "old")), encoding="utf-8")
    return [f"--data_path={path}", f"--data_dir={tmp_path}", "--heldout=5", "--vocab_size=400",
            "--layers=1", "--d_model=16", "--n_heads=2", "--d_ff=32", "--max_tokens=200"]


def test_side_by_side_run_writes_three_rows_and_both_curves(tmp_path, capsys):
    out = tmp_path / "translation.json"
    results = ct.main(corpus(tmp_path) + ["--budget_s=0.5", "--beam_size=2", "--log_interval=1",
                                          "--curve_points=2", "--curve_sentences=3",
                                          f"--out={out}", f"--plot={tmp_path / 'r.png'}"])
    saved = json.load(open(out))
    rows = ["reformer", "reformer_not_reversible", "transformer"]
    assert list(saved["models"]) == rows == list(results["models"])
    assert [saved["models"][k]["reversible"] for k in rows] == [True, False, False]
    for r in saved["models"].values():
        assert r["steps"] >= 1 and r["train_seconds"] >= 0.5 and 0 <= r["bleu"] <= 100
        assert r["n_sentences"] == 5 and r["log"][0]["step"] == 1 and r["log"][0]["seconds"] > 0
        assert r["valid_nll"] < r["valid_loss"] or r["valid_nll"] > 0
        # BLEU against minutes: a snapshot at half the budget, then the final weights
        (half, end) = r["bleu_curve"]
        assert 0.25 <= half["seconds"] < end["seconds"] == round(r["train_seconds"], 1)
        assert half["step"] < end["step"] == r["steps"] and 0 <= half["bleu"] <= 100
    for key in ("step", "seconds"):       # the losses at equal steps and at equal time
        assert set(saved["equal"][key]) == {"at", *rows}
        assert all(len(saved["equal"][key][k]) == 10 for k in rows)
    assert (tmp_path / "r.png").stat().st_size > 0
    ct.main([f"--out={out}", "--table"])
    table = capsys.readouterr().out.split("| step |")[-1].splitlines()
    assert table[0] == " `reformer` | `reformer_not_reversible` | `transformer` |"
    assert len(table) == 2 + 10 + 1 + 2 + 10 and table[-12].startswith("| seconds |")
    # the README block experiments.report generates from it
    block = report.translation_block(str(tmp_path), "results")
    for k, name in report.TRANSLATION_NAMES.items():
        x = saved["models"][k]
        assert f"| {name} | {x['params'] / 1e6:.2f}M | {x['steps']:,} |" in block
        assert block.count(f"| {name} |") == 3   # its scores, its BLEU by minute, its translations
    assert "ours reversible at or above `nn.Transformer` in sacreBLEU and chrF: **" in block
    assert "| source |" in block and "of all 3)" in block


def test_bleu_curve_scores_each_snapshot_and_puts_the_weights_back(tmp_path):
    torch.manual_seed(0)
    model = ReformerEncDec(EncDecConfig(**CFG)).eval()
    pairs = [("ab", "ba"), ("abc", "cba")]

    class Bytes:                     # a tokenizer of single characters, enough for evaluate
        vocab_size = CFG["vocab_size"]
        encode = staticmethod(lambda text: [3 + ord(c) - ord("a") for c in text])
        decode = staticmethod(lambda ids: "".join(chr(ord("a") + i - 3) for i in ids if i >= 3))
        encode_many = classmethod(lambda cls, texts: [cls.encode(t) for t in texts])

    tok = Bytes()
    first = {n: t.clone() for n, t in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    final = {n: t.clone() for n, t in model.state_dict().items()}
    a = ct.parse_args(["--beam_size=2"])
    curve = ct.bleu_curve(model, tok, pairs, [(3, 1.25, first)], a)
    assert all(torch.equal(final[n], t) for n, t in model.state_dict().items())
    model.load_state_dict(first)
    want = ct.evaluate(model, tok, pairs, 2, a.alpha)
    model.load_state_dict(final)
    other = ct.evaluate(model, tok, pairs, 2, a.alpha)
    assert curve == [{"step": 3, "seconds": 1.2, "bleu": want["bleu"], "chrf": want["chrf"]}]
    assert (want["bleu"], want["chrf"]) != (other["bleu"], other["chrf"])   # the test can tell


def test_rows_build_the_reversible_stack_only_for_the_first():
    cfg = EncDecConfig(**CFG)
    built = {k: ct.build_model(kind, ct.replace(cfg, **change), "ours", 0)
             for k, (kind, change) in ct.ROWS.items()}
    assert isinstance(built["reformer"].decoder, ReversibleSequence)
    assert isinstance(built["reformer_not_reversible"], ReformerEncDec)
    assert not isinstance(built["reformer_not_reversible"].decoder, ReversibleSequence)


def test_gap_runs_save_each_run_resume_and_tabulate(tmp_path, capsys):
    out = tmp_path / "gap.json"
    gap = corpus(tmp_path) + ["--gap", "--steps=50", f"--gap_out={out}"]
    ct.main(gap + ["--runs=transformer,ours"])
    first = json.load(open(out))["runs"]
    assert list(first) == ["transformer", "ours"]
    assert [p["step"] for p in first["ours"]["log"]] == list(range(1, 51))
    ct.main(gap + ["--runs=transformer,ours,transformer_no_qkv_bias,transformer_reseeded"])
    runs = json.load(open(out))["runs"]
    assert runs["transformer"] == first["transformer"] and not runs["transformer_no_qkv_bias"][
        "qkv_bias"]
    seeded = runs["transformer_reseeded"]
    assert seeded["seed_offset"] == 1 and seeded["log"][0]["loss"] != first["transformer"][
        "log"][0]["loss"]
    assert "in " in capsys.readouterr().out
    ct.main([f"--gap_out={out}", "--gap", "--table", f"--plot={tmp_path / 'gap.png'}"])
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 + 4 and table[2].startswith("| `transformer` |")
    assert "+0.000 | +0.000 | +0.0 %" in table[2] and (tmp_path / "gap.png").stat().st_size > 0
    with pytest.raises(ValueError, match="'nope' is not one of"):
        ct.main(gap + ["--runs=nope"])
