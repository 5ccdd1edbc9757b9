"""Tests for encdec.py: the encoder-decoder and its decoding.

Cached incremental decoding equals recomputing the whole prefix (logits to 1e-5, float32); greedy
and beam search that drop finished sentences from the batch give exactly the outputs of the
plain versions below, which keep every row and recompute the prefix; min_len holds EOS back; beam
size 1 equals greedy; extra source padding changes nothing; the decoder is causal and reads the
source; reversible gradients equal ordinary backprop (float64, dropout on); chunked loss equals
unchunked. Models are tiny with weights drawn large (std 0.3 instead of 0.02), so outputs depend
strongly on every input and a broken path shows.

Run: python -m pytest tests/test_encdec.py        (a few seconds on two CPU cores)
"""
import math

import pytest
import torch
from conftest import maybe_ordinary

import translation.encdec as encdec
from translation.encdec import (BOS, EOS, PAD, EncDecConfig, ReformerEncDec, _strip, beam_search,
                                greedy_decode, length_penalty)

V = 13


def make_model(seed=0, std=0.3, eos_gain=1.0, **kw):
    """A tiny model with large random weights; eos_gain > 1 (untied weights only) scales the
    EOS output row, so that decoding stops at varied lengths."""
    cfg = dict(vocab_size=V, max_seq_len=32, n_layers=2, n_dec_layers=2, d_model=16,
               n_heads=2, d_ff=32, dropout=0.0, bucket_size=4, n_hashes=2, label_smoothing=0.1,
               attn_init="normal")   # the draws below: the random stream these tests chose
    cfg.update(kw)
    torch.manual_seed(seed)
    model = ReformerEncDec(EncDecConfig(**cfg))
    with torch.no_grad():
        for p in model.parameters():   # matrices redrawn, LayerNorm gains and biases jittered
            p.normal_(0, std) if p.dim() > 1 else p.add_(torch.randn_like(p), alpha=0.1)
        model.lm_head.weight[EOS] *= eos_gain
    return model.eval()


def batch(B=3, S=7, T=6, seed=0):
    """Random source and target-input ids; source rows have 0..2 trailing pads."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, V, (B, S), generator=g)
    for b in range(B):
        src[b, S - b % 3:] = PAD if b % 3 else src[b, S - 1]
    tgt_in = torch.randint(3, V, (B, T), generator=g)
    tgt_in[:, 0] = BOS
    return src, tgt_in


@pytest.mark.parametrize("kw", [dict(), dict(reversible=False), dict(shared_qk=True),
                                dict(tie_weights=False, pos_emb="sinusoidal"),
                                dict(pos_emb="axial", ff_chunks=3, attn="local"),
                                dict(attn="lsh", shared_qk=True, reversible=False),
                                dict(attn="lsh", shared_qk=True, impl="reference")])
def test_cached_step_equals_full_recompute(kw):
    model = make_model(**kw)
    src, tgt_in = batch()
    with torch.no_grad():
        memory, mask = model.encode(src)
        want = model.lm_head(model.decode(tgt_in, memory, mask))        # (B, T, V)
        cache = model.start_cache(memory, mask, max_len=tgt_in.shape[1])
        got = torch.stack([model.step(tgt_in[:, t], t, cache) for t in range(tgt_in.shape[1])],
                          dim=1)
    assert want.std() > 0.5            # logits far from constant: the comparison has teeth
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# -- the oracle: decoding as plain as it gets. Every row stays in the batch to the end, and each
# step reruns the decoder over the whole prefix (no cache). Same search rules as encdec.py.

def logp_recompute(model, tokens, memory, mask, min_len):
    logp = torch.log_softmax(model.lm_head(model.decode(tokens, memory, mask)[:, -1]), -1)
    logp[:, [PAD, BOS]] = -math.inf
    if tokens.shape[1] - 1 < min_len:
        logp[:, EOS] = -math.inf
    return logp


@torch.no_grad()
def plain_greedy(model, src, max_len, min_len=1):
    memory, mask = model.encode(src)
    tokens = torch.full((len(src), 1), BOS)
    done = torch.zeros(len(src), dtype=torch.bool)
    for _ in range(max_len):
        nxt = logp_recompute(model, tokens, memory, mask, min_len).argmax(-1).masked_fill(done, PAD)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        done |= nxt == EOS
        if done.all():
            break
    return [_strip(row) for row in tokens.tolist()]


@torch.no_grad()
def plain_beam(model, src, k, alpha, max_len, min_len=1):
    """fairseq's rules, one sentence at a time, hypotheses as Python lists."""
    out = []
    for b in range(len(src)):
        memory, mask = model.encode(src[b:b + 1])
        beams, done = [([BOS], 0.0)], []
        for t in range(max_len):
            seqs = torch.tensor([s for s, _ in beams])
            logp = logp_recompute(model, seqs, memory.expand(len(beams), -1, -1),
                                  mask.expand(len(beams), -1), min_len)
            cand = torch.tensor([p for _, p in beams])[:, None] + logp        # (beams, V)
            top, idx = cand.view(-1).topk(2 * k)
            ext = [(beams[i // model.config.vocab_size][0] + [i % model.config.vocab_size], p)
                   for p, i in zip(top.tolist(), idx.tolist())]
            for rank, (s, p) in enumerate(ext):
                if s[-1] == EOS and rank < k and len(done) < k:
                    done.append((s, p / length_penalty(t + 1, alpha)))
            if len(done) == k:
                break
            beams = [(s, p) for s, p in ext if s[-1] != EOS][:k]
        else:
            done += [(s, p / length_penalty(len(s) - 1, alpha)) for s, p in beams]
        best = max(done, key=lambda d: d[1])          # the first of equal scores, as max()
        out.append((_strip(best[0]), best[1]))
    return out


@pytest.mark.parametrize("B, max_len", [(1, 6), (4, 12), (7, 20)])
@pytest.mark.parametrize("reversible", [True, False])
def test_greedy_dropping_finished_rows_equals_plain_greedy(B, max_len, reversible):
    lengths = []
    for seed in range(3):
        model = make_model(seed, reversible=reversible, tie_weights=False, eos_gain=1.8)
        src, _ = batch(B=B, seed=seed)
        want = plain_greedy(model, src, max_len, min_len=0)
        assert greedy_decode(model, src, max_len, min_len=0) == want
        assert greedy_decode(model, src, max_len, use_cache=False, min_len=0) == want
        lengths += [len(h) for h in want]
    assert len(set(lengths)) > 2 if B > 1 else True   # rows finished at different steps


@pytest.mark.parametrize("B, k, max_len", [(1, 2, 6), (4, 3, 12), (7, 4, 20)])
def test_beam_search_dropping_finished_sentences_equals_plain_beam_search(B, k, max_len):
    lengths = []
    for seed in range(3):
        model = make_model(seed, reversible=seed != 1, tie_weights=False, eos_gain=1.5)
        src, _ = batch(B=B, seed=seed)
        want = plain_beam(model, src, k, 0.6, max_len, min_len=0)
        hyps, scores = beam_search(model, src, k, 0.6, max_len, return_scores=True, min_len=0)
        assert hyps == [h for h, _ in want]
        torch.testing.assert_close(scores, torch.tensor([s for _, s in want]), rtol=0,
                                   atol=1e-4)
        lengths += [len(h) for h in hyps]
    assert len(set(lengths)) > 2 if B > 1 else True


@pytest.mark.parametrize("min_len", [0, 1, 3])
def test_min_len_holds_eos_back_exactly_that_long(min_len):
    """eos_gain 4: EOS wins as soon as it may, so the shortest output is exactly min_len."""
    model = make_model(0, tie_weights=False, eos_gain=4.0)
    src, _ = batch(B=6, seed=0)
    for hyps in (greedy_decode(model, src, 10, min_len=min_len),
                 beam_search(model, src, 3, 0.6, 10, min_len=min_len)):
        assert min(len(h) for h in hyps) == min_len
    assert greedy_decode(model, src, 10, min_len=min_len) == plain_greedy(model, src, 10, min_len)
    assert ([h for h, _ in plain_beam(model, src, 3, 0.6, 10, min_len)]
            == beam_search(model, src, 3, 0.6, 10, min_len=min_len))
    if min_len == 1:                                    # the default
        assert greedy_decode(model, src, 10) == greedy_decode(model, src, 10, min_len=1)
        assert beam_search(model, src, 3, 0.6, 10) == beam_search(model, src, 3, 0.6, 10,
                                                                  min_len=1)


@pytest.mark.parametrize("min_len", [-1, 1.5, "2"])
def test_bad_min_len_is_a_value_error(min_len):
    model = make_model()
    src, _ = batch()
    for decode in (greedy_decode, beam_search):
        with pytest.raises(ValueError, match=f"min_len={min_len!r} must be an integer >= 0"):
            decode(model, src, max_len=4, min_len=min_len)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_size_one_is_greedy(alpha):
    lengths = set()
    for seed in range(6):
        model = make_model(seed, shared_qk=seed % 2 == 1, reversible=seed < 3,
                           tie_weights=False, eos_gain=2.0)
        src, _ = batch(B=6, seed=seed)
        greedy = greedy_decode(model, src, max_len=12)
        assert greedy == beam_search(model, src, beam_size=1, alpha=alpha, max_len=12)
        assert greedy == greedy_decode(model, src, max_len=12, use_cache=False)
        lengths |= {len(h) for h in greedy}
    assert len(lengths) > 2            # some stopped at EOS, at different lengths


@pytest.mark.parametrize("seed, eos_gain", [(3, 1.0), (0, 2.0), (4, 2.0)])
def test_batched_beam_search_equals_one_sentence_at_a_time(seed, eos_gain):
    """Sentences of one batch finish at different steps (eos_gain 2: many early EOS)."""
    model = make_model(seed, eos_gain=eos_gain, tie_weights=eos_gain == 1.0)
    src, _ = batch(B=6, seed=seed)
    together = beam_search(model, src, beam_size=4, alpha=0.6, max_len=20)
    alone = [beam_search(model, src[b:b + 1], beam_size=4, alpha=0.6, max_len=20)[0]
             for b in range(len(src))]
    assert together == alone
    assert together != greedy_decode(model, src, max_len=20)    # the beam made a difference


@pytest.mark.parametrize("reversible", [True, False])
def test_beam_scores_are_the_models_log_probabilities(reversible):
    """The score beam search reports for its answer equals log P(answer) / lp(|answer|),
    recomputed by a teacher-forced forward pass: the cache was reordered with the beams."""
    model = make_model(3, reversible=reversible, eos_gain=1.5, tie_weights=False)
    src, _ = batch(B=6, seed=3)
    hyps, scores = beam_search(model, src, beam_size=3, alpha=0.6, max_len=20,
                               return_scores=True)
    for b, hyp in enumerate(hyps):
        ended = len(hyp) < 20
        tgt = torch.tensor([[BOS] + hyp + [EOS] * ended])
        with torch.no_grad():
            logp = torch.log_softmax(model(src[b:b + 1], tgt[:, :-1])[0][0], -1)
        total = logp.gather(1, tgt[0, 1:, None]).sum()
        torch.testing.assert_close(scores[b], total / length_penalty(tgt.shape[1] - 1, 0.6),
                                   rtol=0, atol=1e-4)


@pytest.mark.parametrize("kw", [dict(), dict(attn="local", pos_emb="sinusoidal"),
                                dict(reversible=False, shared_qk=True)])
def test_extra_source_padding_changes_nothing(kw):
    model = make_model(1, **kw)
    src, tgt_in = batch()
    longer = torch.cat([src, torch.full((src.shape[0], 5), PAD)], dim=1)
    with torch.no_grad():
        m1, mask1 = model.encode(src)
        m2, mask2 = model.encode(longer)
        torch.testing.assert_close(m2[:, :src.shape[1]][mask1], m1[mask1], rtol=0, atol=1e-5)
        torch.testing.assert_close(model(longer, tgt_in)[0], model(src, tgt_in)[0], rtol=0,
                                   atol=1e-5)
    assert beam_search(model, longer, max_len=10) == beam_search(model, src, max_len=10)


@pytest.mark.parametrize("reversible", [True, False])
def test_decoder_is_causal_and_reads_the_source(reversible):
    model = make_model(2, reversible=reversible)
    src, tgt_in = batch()
    with torch.no_grad():
        base = model(src, tgt_in)[0]
        for j in range(1, tgt_in.shape[1]):
            changed = tgt_in.clone()
            changed[:, j] = (changed[:, j] + 1 - 3) % (V - 3) + 3
            out = model(src, changed)[0]
            torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-6)
            assert (out[:, j:] - base[:, j:]).abs().max() > 1e-3
        other = src.clone()
        other[:, 0] = (other[:, 0] + 1 - 3) % (V - 3) + 3
        assert (model(other, tgt_in)[0] - base).abs().max() > 1e-3


@pytest.mark.parametrize("kw", [dict(), dict(attn="lsh", shared_qk=True, ff_chunks=2)])
def test_reversible_gradients_equal_plain_autograd(kw):
    """float64, dropout 0.2 everywhere (embeddings, attention weights, sub-layers, FF)."""
    model = make_model(4, dropout=0.2, **kw).double().train()
    src, tgt_in = batch()
    targets = torch.randint(3, V, tgt_in.shape)
    targets[0, -2:] = -100

    def grads(reversible):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        with maybe_ordinary(reversible, model.encoder, model.decoder):
            loss = model(src, tgt_in, targets)[1]
        loss.backward()
        return [loss.detach()] + [p.grad for p in model.parameters()]

    want, got = grads(False), grads(True)
    assert all(g is not None for g in want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    torch.manual_seed(12)
    assert (model(src, tgt_in, targets)[1] - want[0]).abs() > 1e-6   # dropout really is on


@pytest.mark.parametrize("S", [1, 5, 9, 17])
@pytest.mark.parametrize("reversible", [True, False])
def test_sdpa_encoder_equals_explicit_attention(S, reversible):
    """Separate keys (the default): impl='fast' runs the encoder's self-attention (and the
    decoder's) through F.scaled_dot_product_attention with the source padding as an additive
    bias and one fused q/k/v projection; impl='reference' through lsh_attention's Part 1, the
    explicit masked softmax. The same weights give the same loss and gradients in float64 (with
    the bias off or of the wrong sign, the padded rows' gradients differ)."""
    fast = make_model(7, reversible=reversible).double()
    explicit = make_model(8, reversible=reversible, impl="reference").double()
    explicit.load_state_dict(fast.state_dict())
    src, tgt_in = batch(B=4, S=S, T=5, seed=S)
    src[1, max(1, S // 2):] = PAD                       # a half-padded source, and a longer pad
    src[3, 1:] = PAD
    targets = torch.randint(3, V, tgt_in.shape)
    out = []
    for model in (fast, explicit):
        model.train()
        loss = model(src, tgt_in, targets)[1]
        loss.backward()
        out.append([loss.detach()] + [p.grad for p in model.parameters()])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_chunked_loss_equals_unchunked_with_label_smoothing():
    a, b = make_model(5), make_model(5, ff_chunks=4)
    b.load_state_dict(a.state_dict())
    src, tgt_in = batch()
    targets = torch.randint(3, V, tgt_in.shape)
    torch.testing.assert_close(a(src, tgt_in, targets)[1], b(src, tgt_in, targets)[1],
                               rtol=0, atol=1e-6)
    plain = make_model(5, label_smoothing=0.0)
    plain.load_state_dict(a.state_dict())
    assert (plain(src, tgt_in, targets)[1] - a(src, tgt_in, targets)[1]).abs() > 1e-3


def test_tied_and_untied_parameters():
    tied, untied = make_model(tie_weights=True), make_model(tie_weights=False)
    assert tied.lm_head.weight is tied.src_emb.weight is tied.tgt_emb.weight
    assert untied.num_params() - tied.num_params() == 2 * V * 16


@pytest.mark.parametrize("kw, match", [(dict(n_dec_layers=0), "n_dec_layers=0"),
                                       (dict(vocab_size=2), "vocab_size=2"),
                                       (dict(label_smoothing=1.0), "label_smoothing"),
                                       (dict(attn="lsh", shared_qk=False), "shared_qk"),
                                       (dict(d_model=15), "divisible")])
def test_bad_config_is_a_value_error(kw, match):
    with pytest.raises(ValueError, match=match):
        make_model(**kw)


def test_bad_input_is_a_value_error():
    model = make_model()
    src, tgt_in = batch()
    with pytest.raises(ValueError, match="src: token ids"):
        model(src + V, tgt_in)
    with pytest.raises(ValueError, match="tgt_in: sequence length T=33"):
        model(src, torch.full((1, 33), BOS))
    with pytest.raises(ValueError, match="beam_size=7"):
        beam_search(model, src, beam_size=7)


def saved_bytes(model, src, tgt_in, targets):
    """Bytes of the distinct non-parameter storages autograd saves during a training forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(src, tgt_in, targets)[1]
    del loss
    return sum(saved.values())


def test_saved_memory_is_flat_in_depth_when_reversible():
    """Encoder and decoder depth 1 vs 4: reversible saves the same bytes (the stacks keep their
    outputs and the encoder output only), plain autograd saves more with every layer."""
    src, tgt_in = batch()
    targets = torch.randint(3, V, tgt_in.shape)
    got = {}
    for reversible in (True, False):
        for depth in (1, 4):
            model = make_model(dropout=0.1, reversible=reversible, n_layers=depth,
                               n_dec_layers=depth).train()
            got[reversible, depth] = saved_bytes(model, src, tgt_in, targets)
    assert got[True, 1] == got[True, 4]
    assert got[False, 4] > 2 * got[False, 1] > 2 * got[True, 1]


def test_cross_attention_takes_attn_dropout():
    model = make_model(dropout=0.1, attn_dropout=0.25)
    crosses = [m for m in model.modules() if type(m).__name__ == "CrossAttention"]
    assert crosses and all(c.dropout == 0.25 for c in crosses)
    assert make_model(dropout=0.1).decoder.blocks[0].f.cross.dropout == 0.1


def test_attention_input_projections_start_as_nn_multiheadattention_draws_them():
    """attn_init='xavier' (the default): U(-a, a), a = sqrt(6 / 4C), for the self-attentions'
    q, k, v and the cross-attention's q, kv; 'normal': N(0, 0.02) as every other weight."""
    C = 64
    cfg = dict(vocab_size=50, n_layers=2, n_dec_layers=2, d_model=C, n_heads=4, d_ff=64)
    torch.manual_seed(0)
    xavier = ReformerEncDec(EncDecConfig(**cfg))
    normal = ReformerEncDec(EncDecConfig(**cfg, attn_init="normal"))
    ws = list(encdec.attention_in_projections(xavier))
    assert len(ws) == 2 * 3 + 2 * 3 + 2 * 2   # encoder and decoder q, k, v; cross q, kv
    a = math.sqrt(6 / (4 * C))
    for w in ws:
        w = w.detach()
        assert float(w.abs().max()) <= a and float(w.std()) == pytest.approx(a / 3 ** 0.5, rel=0.1)
    for w in encdec.attention_in_projections(normal):
        assert float(w.detach().std()) == pytest.approx(0.02, rel=0.1)
    assert float(xavier.lm_head.weight.detach().std()) == pytest.approx(0.02, rel=0.1)   # the rest
    with pytest.raises(ValueError, match="attn_init='uniform' is not one of"):
        EncDecConfig(**cfg, attn_init="uniform")
