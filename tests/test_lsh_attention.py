"""Tests for lsh_attention.py: the angular hash, LSH attention against a loop-by-loop reference and
against full attention, dedup convergence, causality, hand-written gradients, local and full
attention against dense references, half precision, masking without NaN, the multi-head layer, and
the errors raised on bad input.

Run: python -m pytest tests/test_lsh_attention.py        (about 10 s on two CPU cores)
     HYPOTHESIS_PROFILE=ci python -m pytest tests/test_lsh_attention.py   (derandomised, as CI)

References, all written here independently of the module's internals:
  * `ref_lsh_attention`: the nine steps of lsh_attention.py (Part 1's numbering: 1 hash, 2 sort,
    3 shared-QK keys, 4 chunk and look one back, 5 logits and masks, 6 dedup, 7 softmax in each
    round, 8 undo the sort, 9 combine the rounds) as plain Python loops over batch rows, rounds
    and queries. It checks both implementations, Part 1 (`lsh_attention`, the readable one) and
    Part 2 (`lsh_attention_fast`), and test_fast_equals_reference checks the two against each
    other in values and gradients.
  * `dense_reference`: textbook softmax attention with an explicit (B, T, T) mask of allowed keys,
    used for full attention (shared QK or not) and for local attention (a banded mask).
Exact comparisons run in float64 (tolerance 1e-10); "float32 precision" means 1e-5.
Outputs at padded *query* positions are unspecified (but must be finite): only real query
positions are compared, and finiteness is asserted everywhere separately.
"""
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lsh_attention import (FULL_KINDS, LSHSelfAttention, full_attention, full_attention_fast,
                           hash_vectors, local_attention, local_attention_fast, lsh_attention,
                           lsh_attention_fast, lsh_attention_heads)

SELF_LOGIT, MASKED_LOGIT = -1e5, -1e9   # the authors' values (trax)

# Part 1 (the readable reference) and Part 2 (fast) of lsh_attention.py: most tests run on both.
# Part 1 through lsh_attention_heads, which also takes heads side by side and half precision (and
# passes (B, T, hs) float inputs straight to lsh_attention).
LSH = {"reference": lsh_attention_heads, "fast": lsh_attention_fast}
LOCAL = {"reference": local_attention, "fast": local_attention_fast}
both = pytest.mark.parametrize("impl", ["reference", "fast"])



@pytest.fixture(autouse=True)
def seeded():
    # Every draw from the global RNG (rotations, dropout, test inputs) is reproducible.
    torch.manual_seed(0)


# -----------------------------------------------------------------------------------------------
# Inputs and references
# -----------------------------------------------------------------------------------------------

def make_inputs(B, T, hs, seed, dtype=torch.float64, pad=False, hs_v=None, scale=2.0):
    """qk (B, T, hs), v (B, T, hs_v) and a padding mask (B, T) bool (True = real) or None.
    With pad, each row keeps a random ~70% of its positions, at least one."""
    g = torch.Generator().manual_seed(seed)
    qk = scale * torch.randn(B, T, hs, generator=g, dtype=dtype)
    v = torch.randn(B, T, hs_v or hs, generator=g, dtype=dtype)
    mask = None
    if pad:
        mask = torch.rand(B, T, generator=g) < 0.7
        mask[torch.arange(B), torch.randint(0, T, (B,), generator=g)] = True
    return qk, v, mask


def make_rotations(B, hs, n_hashes, n_buckets, seed, per_row=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed + 1)
    shape = (B, hs, n_hashes, n_buckets // 2) if per_row else (hs, n_hashes, n_buckets // 2)
    return torch.randn(*shape, generator=g, dtype=dtype)


def ref_buckets(x, rot, n_buckets):
    """h(x) = argmax([xR; -xR]) for one row. x: (T, hs), rot: (hs, n_hashes, n_buckets/2).
    Returns a list over rounds of a list over positions."""
    out = []
    for r in range(rot.shape[1]):
        proj = x @ rot[:, r, :]                                # (T, n_buckets/2)
        out.append(torch.cat([proj, -proj], dim=-1).argmax(dim=-1).tolist())
    return out


def ref_windows(buckets, m):
    """For one round: sort positions by (bucket, position), cut into chunks of m; position i sees
    its own chunk and the chunk before it, the first chunk seeing the last. Returns a list of
    sets: window[i] = {j : floor(s_i/m) - 1 <= floor(s_j/m) <= floor(s_i/m)  (mod n_chunks)}."""
    T = len(buckets)
    order = sorted(range(T), key=lambda j: (buckets[j], j))
    nc = T // m
    chunks = [order[c * m:(c + 1) * m] for c in range(nc)]
    chunk_of = {j: s // m for s, j in enumerate(order)}
    return [set(chunks[chunk_of[i]]) | set(chunks[(chunk_of[i] - 1) % nc]) for i in range(T)]


def ref_lsh_attention(qk, v, bucket_size, rotations, causal=False, padding_mask=None,
                      dedup=False):
    """Steps 1-9 of lsh_attention.py, loop by loop, in Python floats. -> (B, T, hs_v) float64."""
    B, T, hs = qk.shape
    n_buckets, n_hashes = T // bucket_size, rotations.shape[-2]
    out = torch.zeros(B, T, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        rot = rotations[b] if rotations.dim() == 4 else rotations
        q, vals = qk[b].tolist(), v[b].tolist()
        real = [True] * T if padding_mask is None else padding_mask[b].tolist()
        norms = [math.sqrt(sum(x * x for x in q[j])) for j in range(T)]
        k_hat = [[x / norms[j] for x in q[j]] for j in range(T)]   # 3. keys = q / |q|
        # 1., 2. and 4.: hash, sort and window, each round on its own
        windows = [ref_windows(bk, bucket_size) for bk in ref_buckets(qk[b], rot, n_buckets)]
        for i in range(T):
            lses, outs = [], []
            for r in range(n_hashes):
                keys = sorted(windows[r][i])
                logits = []
                for j in keys:
                    if not real[j] or (causal and j > i):
                        s = MASKED_LOGIT                               # 5. invalid key
                    elif j == i:
                        s = SELF_LOGIT                                 # 5. own position
                    else:
                        s = sum(a * c for a, c in zip(q[i], k_hat[j]))
                    if dedup:                                          # 6. count each key once
                        s -= math.log(sum(j in windows[rr][i] for rr in range(n_hashes)))
                    logits.append(s)
                mx = max(logits)
                z = sum(math.exp(s - mx) for s in logits)
                lses.append(mx + math.log(z))
                outs.append([sum(math.exp(s - mx) / z * vals[j][d] for s, j in zip(logits, keys))
                             for d in range(len(vals[0]))])
            mx = max(lses)                                             # 8., 9. combine rounds
            total = mx + math.log(sum(math.exp(l - mx) for l in lses))
            for r in range(n_hashes):
                w = math.exp(lses[r] - total)
                for d in range(len(outs[r])):
                    out[b, i, d] += w * outs[r][d]
    return out


def allowed_mask(B, T, causal=False, padding_mask=None, bucket_size=None):
    """(B, T, T) bool, True where query i may use key j: causal, padding, and for local attention
    the band 'own chunk or the chunk before it' (the first chunk has no chunk before it)."""
    i = torch.arange(T).view(T, 1)
    j = torch.arange(T).view(1, T)
    ok = torch.ones(T, T, dtype=torch.bool)
    if causal:
        ok &= j <= i
    if bucket_size is not None:
        ci, cj = i // bucket_size, j // bucket_size
        ok &= (cj == ci) | (cj == ci - 1)
    ok = ok.expand(B, T, T).clone()
    if padding_mask is not None:
        ok &= padding_mask.view(B, 1, T)
    return ok


def dense_reference(q, k, v, allowed, shared_qk):
    """softmax(q k^T / sqrt(hs)) v with disallowed keys at -inf; with shared QK the keys are
    q / |q|, no 1/sqrt(hs), and a query's own logit is -1e5."""
    if shared_qk:
        k_hat = q / q.norm(dim=-1, keepdim=True)
        logits = q @ k_hat.transpose(-1, -2)                   # (B, T, T)
        eye = torch.eye(q.shape[1], dtype=torch.bool)
        logits = logits.masked_fill(eye, SELF_LOGIT)
    else:
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


def dense_logits_shared(qk):
    """Full shared-QK logits (B, T, T) with the own position at -1e5."""
    logits = qk @ F.normalize(qk, dim=-1).transpose(-1, -2)
    return logits.masked_fill(torch.eye(qk.shape[1], dtype=torch.bool), SELF_LOGIT)


def real_rows(x, mask):
    """Outputs at real query positions only: (N, hs)."""
    return x.reshape(-1, x.shape[-1]) if mask is None else x[mask]


def assert_close_real(out, ref, mask, atol, rtol=0.0):
    assert torch.isfinite(out).all(), "non-finite output"
    torch.testing.assert_close(real_rows(out, mask), real_rows(ref, mask).to(out.dtype),
                               atol=atol, rtol=rtol)


# LSH sizes: bucket_size m and an even number of buckets, T = m * n_buckets <= 32 (loops stay fast)
lsh_sizes = st.tuples(st.sampled_from([1, 2, 3, 4]), st.sampled_from([2, 4, 6, 8]))


# -----------------------------------------------------------------------------------------------
# 1. Angular LSH
# -----------------------------------------------------------------------------------------------

@settings(max_examples=20)
@given(B=st.integers(1, 3), T=st.integers(1, 20), hs=st.integers(1, 8),
       n_buckets=st.sampled_from([2, 4, 6, 8, 16]), n_hashes=st.integers(1, 5),
       rot=st.sampled_from(["none", "shared", "per_row"]), seed=st.integers(0, 2**16))
def test_hash_shape_range_dtype_and_invariances(B, T, hs, n_buckets, n_hashes, rot, seed):
    x = torch.randn(B, T, hs, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    scale = torch.empty(B, T, 1, dtype=torch.float64).uniform_(
        -4, 4, generator=torch.Generator().manual_seed(seed + 1)).exp()   # positive
    rotations = None if rot == "none" else \
        make_rotations(B, hs, n_hashes, n_buckets, seed, per_row=rot == "per_row")
    # x, -x and s * x in one call, so they share the (possibly fresh) rotations
    both = hash_vectors(torch.cat([x, -x, scale * x], dim=1), n_buckets, n_hashes, rotations)
    assert both.shape == (B, n_hashes, 3 * T) and both.dtype == torch.int64
    assert both.min() >= 0 and both.max() < n_buckets
    h, h_neg, h_scaled = both.split(T, dim=-1)
    assert torch.equal(h_scaled, h), "positive scaling changed a bucket"
    assert torch.equal(h_neg, (h + n_buckets // 2) % n_buckets), "x and -x not n_buckets/2 apart"
    if rotations is not None:   # the hash is argmax([xR; -xR]), round by round
        for b in range(B):
            rb = rotations[b] if rot == "per_row" else rotations
            assert h[b].tolist() == ref_buckets(x[b], rb, n_buckets)


def test_shared_rotations_equal_per_row_rotations_expanded():
    x = torch.randn(3, 10, 5, dtype=torch.float64)
    rot = torch.randn(5, 4, 3, dtype=torch.float64)
    assert torch.equal(hash_vectors(x, 6, 4, rot), hash_vectors(x, 6, 4, rot.expand(3, -1, -1, -1)))


def test_collision_rate_falls_with_angle():
    """Two unit vectors at angle theta, hashed by 4000 independent rounds. For n_buckets = 2 the
    hash is the sign of one random projection, whose collision probability is exactly
    1 - theta / pi (Charikar 2002): checked within 5 standard errors. For n_buckets = 8 the rate
    must fall strictly with the angle, from 1 at theta = 0 to 0 at theta = pi."""
    torch.manual_seed(0)
    hs, rounds = 16, 4000
    u, w = torch.linalg.qr(torch.randn(hs, 2, dtype=torch.float64))[0].T   # orthonormal pair
    angles = [0.0, 0.3, 0.7, 1.2, 1.8, 2.4, math.pi]
    x = torch.stack([t for a in angles for t in (u, math.cos(a) * u + math.sin(a) * w)])
    for n_buckets in (2, 8):
        h = hash_vectors(x.unsqueeze(0), n_buckets, rounds)[0]          # (rounds, 2 * angles)
        rate = [(h[:, 2 * k] == h[:, 2 * k + 1]).double().mean().item() for k in range(len(angles))]
        assert rate[0] == 1.0 and rate[-1] == 0.0, rate
        se = lambda *ps: math.sqrt(sum(p * (1 - p) for p in ps) / rounds)   # binomial
        assert all(a - b > 3 * se(a, b) for a, b in zip(rate, rate[1:])), rate
        if n_buckets == 2:
            for a, p in zip(angles, rate):
                assert abs(p - (1 - a / math.pi)) < 5 * se(1 - a / math.pi) + 1e-12, (a, p)


@both
def test_rotations_fresh_every_call_and_independent_per_row(impl):
    torch.manual_seed(0)
    x = torch.randn(1, 64, 8).expand(4, -1, -1)                  # four identical rows ("heads")
    h1, h2 = hash_vectors(x, 8, 2), hash_vectors(x, 8, 2)
    assert not torch.equal(h1, h2), "the same rotations were drawn twice"
    for b in range(1, 4):
        assert not torch.equal(h1[0], h1[b]), "rows (heads) share their rotations"
    # ... and the draws come from the global RNG, so a seed reproduces them
    torch.manual_seed(5)
    a = hash_vectors(x, 8, 2)
    torch.manual_seed(5)
    assert torch.equal(a, hash_vectors(x, 8, 2))
    # the same holds one level up, for lsh_attention
    qk, v, _ = make_inputs(2, 32, 4, seed=3, dtype=torch.float32)
    torch.manual_seed(5)
    o1 = LSH[impl](qk, v, 4, 2)
    torch.manual_seed(5)
    assert torch.equal(o1, LSH[impl](qk, v, 4, 2))
    assert not torch.allclose(o1, LSH[impl](qk, v, 4, 2))


# -----------------------------------------------------------------------------------------------
# 2. LSH attention against the loop-by-loop reference and against full attention
# -----------------------------------------------------------------------------------------------

@settings(max_examples=25)
@given(B=st.integers(1, 2), sizes=lsh_sizes, hs=st.integers(1, 5), hs_v=st.integers(1, 3),
       n_hashes=st.integers(1, 4), causal=st.booleans(), pad=st.booleans(), dedup=st.booleans(),
       per_row=st.booleans(), seed=st.integers(0, 2**16))
def test_lsh_equals_loop_reference(B, sizes, hs, hs_v, n_hashes, causal, pad, dedup, per_row, seed):
    m, n_buckets = sizes
    T = m * n_buckets
    qk, v, mask = make_inputs(B, T, hs, seed, pad=pad, hs_v=hs_v)
    rot = make_rotations(B, hs, n_hashes, n_buckets, seed, per_row=per_row)
    ref = ref_lsh_attention(qk, v, m, rot, causal=causal, padding_mask=mask, dedup=dedup)
    for lsh in LSH.values():   # the oracle, once, against both implementations
        out = lsh(qk, v, m, n_hashes, causal=causal, padding_mask=mask, rotations=rot, dedup=dedup)
        assert out.shape == (B, T, hs_v) and out.dtype == torch.float64
        assert_close_real(out, ref, mask, atol=1e-10)


def test_lsh_reference_fixed_example_with_several_windows():
    """One fixed case in which the wrap-around (first chunk sees the last), several buckets per
    window and dedup all matter: the reference and the module must agree, and the case must be
    sensitive to each of them (otherwise agreement would prove little)."""
    B, m, n_buckets, hs, n_hashes = 2, 2, 8, 4, 3
    T = m * n_buckets
    qk, v, mask = make_inputs(B, T, hs, seed=11, pad=True)
    rot = make_rotations(B, hs, n_hashes, n_buckets, seed=11)
    ref = ref_lsh_attention(qk, v, m, rot, causal=True, padding_mask=mask, dedup=True)
    no_dedup = ref_lsh_attention(qk, v, m, rot, causal=True, padding_mask=mask, dedup=False)
    assert (real_rows(no_dedup - ref, mask).abs().max() > 1e-3)
    first_real = [int(mask[b].nonzero()[0]) for b in range(B)]
    for lsh in LSH.values():
        out = lsh(qk, v, m, n_hashes, causal=True, padding_mask=mask, rotations=rot, dedup=True)
        assert_close_real(out, ref, mask, atol=1e-10)
        # a query whose only valid key is itself returns its own value: the first real query
        # under causal masking
        for b, t in enumerate(first_real):
            torch.testing.assert_close(out[b, t], v[b, t], atol=1e-12, rtol=0)


@both
@settings(max_examples=20)
@given(B=st.integers(1, 3), m=st.integers(1, 8), hs=st.integers(1, 8), n_hashes=st.integers(1, 8),
       causal=st.booleans(), pad=st.booleans(), dedup=st.booleans(), seed=st.integers(0, 2**16))
def test_lsh_equals_full_attention_when_T_is_two_buckets(impl, B, m, hs, n_hashes, causal, pad,
                                                          dedup, seed):
    """T == 2 * bucket_size: two chunks, each sees itself and the other, so every query sees every
    key exactly once per round and all rounds are equal: LSH == full shared-QK attention, with
    fresh random rotations, to float32 precision."""
    T = 2 * m
    qk, v, mask = make_inputs(B, T, hs, seed, dtype=torch.float32, pad=pad)
    out = LSH[impl](qk, v, m, n_hashes, causal=causal, padding_mask=mask, dedup=dedup)
    full = full_attention(qk, None, v, causal=causal, padding_mask=mask, shared_qk=True)
    assert out.dtype == torch.float32
    assert_close_real(out, full, mask, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(full).all()


@both
def test_dedup_converges_to_full_attention(impl):
    """Attention equivalence as n_hashes grows (step 6, dedup), on clustered inputs where full
    attention is peaked: 8 clusters of exactly 4 = bucket_size members, |q| = 12, so each query
    puts >= 90% of its weight on its 3 cluster-mates.

    What is proved, and asserted for every n_hashes: with dedup every key in the union U_i of
    query i's windows counts exactly once, so the output is softmax attention restricted to U_i,
        o_i = sum_{j in U_i} p_ij v_j / p_i(U_i),     p_i = full shared-QK attention weights,
    hence |o_i - full_i|_inf <= ||p_i restricted and renormalised - p_i||_1 * max|v|
                             = 2 * p_i(not U_i) * max|v|.
    The first n_hashes rounds of the same rotations are used for n_hashes = 1, 4, 16, 64, so the
    U_i are nested and the missed mass p_i(not U_i), hence the bound, can only fall (asserted). Convergence needs
    clusters no larger than a chunk: a key that always sorts more than bucket_size slots after the
    query in its bucket is never in its window (it sees its own chunk and the one before).
    Measured (seed 0, max over 128 queries, both implementations): error 2.8 / 1.6 / 0.006 /
    2.7e-15 for n_hashes = 1 / 4 / 16 / 64, and at n_hashes = 64 the missed mass is exactly 0
    (every key in every union), so the bound says the error is rounding only. We assert a strict
    fall at each step, a missed mass of 0 at n_hashes = 64 and an error below 1e-10 there. Without dedup the error
    stays above 0.1 (measured 0.66): keys seen in many rounds are over-counted."""
    B, T, hs, m, cluster, R_max = 4, 32, 16, 4, 4, 64
    n_buckets, n_clusters = T // m, T // cluster
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(B, n_clusters, hs, generator=g, dtype=torch.float64), dim=-1)
    which = torch.stack([torch.randperm(T, generator=g) % n_clusters for _ in range(B)])  # (B, T)
    direction = centres[torch.arange(B).view(B, 1), which] \
        + 0.1 * torch.randn(B, T, hs, generator=g, dtype=torch.float64)
    qk = 12.0 * F.normalize(direction, dim=-1)                 # |q| = 12: peaked softmax
    v = torch.randn(B, T, 4, generator=g, dtype=torch.float64)
    rot = torch.randn(B, hs, R_max, n_buckets // 2, generator=g, dtype=torch.float64)

    full = full_attention(qk, None, v, shared_qk=True)
    p = torch.softmax(dense_logits_shared(qk), dim=-1)         # (B, T, T) full attention weights
    same_cluster = which.unsqueeze(-1) == which.unsqueeze(-2)
    assert (p * same_cluster).sum(-1).min() > 0.9              # peaked, as claimed
    windows = [[ref_windows(bk, m) for bk in ref_buckets(qk[b], rot[b], n_buckets)]
               for b in range(B)]
    errors, missed = [], []
    for n_hashes in (1, 4, 16, 64):
        out = LSH[impl](qk, v, m, n_hashes, rotations=rot[:, :, :n_hashes].contiguous(), dedup=True)
        in_union = torch.zeros(B, T, T, dtype=torch.bool)
        for b in range(B):
            for i in range(T):
                seen = set().union(*(windows[b][r][i] for r in range(n_hashes)))
                in_union[b, i, sorted(seen)] = True
        restricted = p * in_union
        restricted = restricted / restricted.sum(-1, keepdim=True)
        # the identity (measured: to 4e-15)
        torch.testing.assert_close(out, restricted @ v, atol=1e-10, rtol=0)
        miss = (p * ~in_union).sum(-1)                          # (B, T) missed full-attention mass
        err = (out - full).abs().amax(-1)                       # (B, T)
        assert (err <= 2 * miss * v.abs().max() + 1e-6).all()   # the bound
        errors.append(err.max().item())
        missed.append(miss)
    for a, b in zip(missed, missed[1:]):
        assert (b <= a + 1e-15).all(), "unions not nested: missed mass grew"
    assert errors[0] > errors[1] > errors[2] > errors[3], errors
    assert errors[0] > 1.0 and missed[3].max() == 0 and errors[3] < 1e-10, errors
    no_dedup = LSH[impl](qk, v, m, R_max, rotations=rot, dedup=False)
    assert (no_dedup - full).abs().max() > 0.1


def _values_and_grads(fn, inputs, mask, seed):
    """fn(*inputs) and the gradients of <out, g> for a fixed random g, g = 0 at padded queries
    (their outputs are unspecified: a padded query may see no valid key, and then the two
    implementations' uniform weights differ by rounding at -1e9, about 1e-7)."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    torch.manual_seed(seed)                                    # the same fresh rotations in both
    out = fn(*inputs)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))
    if mask is not None:
        g = g * mask.view(*mask.shape, *([1] * (out.dim() - 2)))
        out = out * mask.view(*mask.shape, *([1] * (out.dim() - 2)))
    return [out, *torch.autograd.grad((out * g).sum(), inputs, materialize_grads=True)]


@settings(max_examples=40)
@given(B=st.integers(1, 3), sizes=st.tuples(st.sampled_from([1, 2, 3, 4, 8]),
                                            st.sampled_from([2, 4, 6, 8])),
       nh=st.sampled_from([None, 1, 2, 3]), hs=st.integers(1, 5), n_hashes=st.integers(1, 4),
       causal=st.booleans(), pad=st.booleans(), dedup=st.booleans(),
       rotations=st.sampled_from(["fresh", "shared", "per_row"]), seed=st.integers(0, 2**16))
def test_fast_equals_reference(B, sizes, nh, hs, n_hashes, causal, pad, dedup, rotations, seed):
    """Part 2 (lsh_attention_fast) computes Part 1 (lsh_attention): the same outputs and the same
    gradients for qk and v, float64, to 1e-10, over B, T, bucket_size, n_hashes (1 included),
    causal or not, padding, dedup, heads side by side (nh) or in the batch (nh None), and
    rotations given or drawn fresh from the same seed."""
    m, n_buckets = sizes
    T = m * n_buckets
    rows = B * (nh or 1)
    qk, v, mask = make_inputs(B, T, hs * (nh or 1), seed, pad=pad, hs_v=2 * (nh or 1))
    if nh is not None:
        qk, v = qk.view(B, T, nh, hs), v.view(B, T, nh, 2)
    rot = None if rotations == "fresh" else \
        make_rotations(rows, hs, n_hashes, n_buckets, seed, per_row=rotations == "per_row")
    kw = dict(causal=causal, padding_mask=mask, rotations=rot, dedup=dedup)
    ref = _values_and_grads(lambda q_, v_: LSH["reference"](q_, v_, m, n_hashes, **kw), (qk, v),
                            mask, seed)
    fast = _values_and_grads(lambda q_, v_: lsh_attention_fast(q_, v_, m, n_hashes, **kw),
                             (qk, v), mask, seed)
    for name, a, b in zip(("output", "d qk", "d v"), ref, fast):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=0, msg=lambda e: f"{name}: {e}")


@settings(max_examples=20)
@given(B=st.integers(1, 2), m=st.integers(1, 4), nc=st.integers(1, 5), hs=st.integers(1, 5),
       causal=st.booleans(), pad=st.booleans(), shared=st.booleans(), seed=st.integers(0, 2**16))
def test_local_fast_equals_reference(B, m, nc, hs, causal, pad, shared, seed):
    """local_attention_fast computes local_attention: outputs and gradients, float64, 1e-10."""
    T = m * nc
    q, v, mask = make_inputs(B, T, hs, seed, pad=pad)
    k = torch.randn(B, T, hs, dtype=torch.float64)
    kw = dict(causal=causal, padding_mask=mask, shared_qk=shared)
    ref = _values_and_grads(lambda *x: local_attention(*x, m, **kw), (q, k, v), mask, seed)
    fast = _values_and_grads(lambda *x: local_attention_fast(*x, m, **kw), (q, k, v), mask, seed)
    for a, b in zip(ref, fast):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=0)


# -----------------------------------------------------------------------------------------------
# 3. Causality and padding
# -----------------------------------------------------------------------------------------------

@both
@settings(max_examples=20)
@given(B=st.integers(1, 2), sizes=lsh_sizes, hs=st.integers(1, 5), n_hashes=st.integers(1, 4),
       pad=st.booleans(), dedup=st.booleans(), cut=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_lsh_causal_future_values_and_positive_scales_do_not_leak(impl, B, sizes, hs, n_hashes, pad,
                                                                  dedup, cut, seed):
    """Future values changed arbitrarily, future qk scaled by positive numbers (same buckets, so
    the same chunks): outputs before the cut do not move. Rotations come from the same seed."""
    m, n_buckets = sizes
    T = m * n_buckets
    t0 = min(T - 1, int(cut * T))
    qk, v, mask = make_inputs(B, T, hs, seed, pad=pad)
    qk2, v2 = qk.clone(), v.clone()
    g = torch.Generator().manual_seed(seed + 7)
    v2[:, t0:] = 10 * torch.randn(B, T - t0, hs, generator=g, dtype=torch.float64)
    qk2[:, t0:] *= torch.empty(B, T - t0, 1, dtype=torch.float64).uniform_(-3, 3, generator=g).exp()
    outs = []
    for q_, v_ in ((qk, v), (qk2, v2)):
        torch.manual_seed(seed)
        outs.append(LSH[impl](q_, v_, m, n_hashes, causal=True, padding_mask=mask,
                                  dedup=dedup))
    keep = torch.zeros(B, T, dtype=torch.bool)
    keep[:, :t0] = True
    keep &= True if mask is None else mask
    torch.testing.assert_close(outs[1][keep], outs[0][keep], atol=1e-12, rtol=0)


@both
def test_non_causal_lsh_does_see_the_future(impl):
    """Controls for the test above: without the causal mask the same change moves earlier
    outputs; with it, the change does reach the later outputs."""
    qk, v, _ = make_inputs(1, 16, 4, seed=0)
    rot = make_rotations(1, 4, 2, 8, seed=0)
    v2 = v.clone()
    v2[:, 8:] += 5.0
    a = LSH[impl](qk, v, 2, 2, rotations=rot)
    b = LSH[impl](qk, v2, 2, 2, rotations=rot)
    assert (a[:, :8] - b[:, :8]).abs().max() > 1e-3
    a = LSH[impl](qk, v, 2, 2, rotations=rot, causal=True)
    b = LSH[impl](qk, v2, 2, 2, rotations=rot, causal=True)
    assert (a[:, :8] - b[:, :8]).abs().max() == 0 and (a[:, 8:] - b[:, 8:]).abs().max() > 1e-3


@both
@pytest.mark.parametrize("kind", ["full_shared", "full", "local_shared", "local"])
def test_full_and_local_causal_do_not_see_the_future_at_all(impl, kind):
    """Full and local attention are strictly causal: any change to the future, qk included."""
    B, T, hs, t0 = 2, 12, 4, 5
    q, v, mask = make_inputs(B, T, hs, seed=1, pad=True)
    k = torch.randn(B, T, hs, dtype=torch.float64)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[:, t0:] = torch.randn(B, T - t0, hs, dtype=torch.float64)
    shared = kind.endswith("shared")

    def run(q_, k_, v_):
        if kind.startswith("full"):
            return full_attention(q_, k_, v_, causal=True, padding_mask=mask, shared_qk=shared)
        return LOCAL[impl](q_, k_, v_, 3, causal=True, padding_mask=mask, shared_qk=shared)

    a, b = run(q, k, v), run(q2, k2, v2)
    keep = mask.clone()
    keep[:, t0:] = False
    torch.testing.assert_close(a[keep], b[keep], atol=1e-12, rtol=0)
    assert not torch.allclose(a[:, t0:][mask[:, t0:]], b[:, t0:][mask[:, t0:]])


@both
def test_lsh_padding_keys_never_influence_real_outputs(impl):
    """Changing padded values, and scaling padded qk by positive numbers (same buckets), leaves
    every real output unchanged; changing a real value does change outputs (sensitivity)."""
    B, m, n_buckets, hs, n_hashes = 2, 2, 8, 4, 3
    T = m * n_buckets
    qk, v, mask = make_inputs(B, T, hs, seed=4, pad=True)
    rot = make_rotations(B, hs, n_hashes, n_buckets, seed=4)
    qk2, v2 = qk.clone(), v.clone()
    v2[~mask] = 100.0
    qk2[~mask] *= 7.5
    for dedup in (False, True):
        a = LSH[impl](qk, v, m, n_hashes, padding_mask=mask, rotations=rot, dedup=dedup)
        b = LSH[impl](qk2, v2, m, n_hashes, padding_mask=mask, rotations=rot, dedup=dedup)
        torch.testing.assert_close(a[mask], b[mask], atol=1e-12, rtol=0)
        mask_all = torch.ones_like(mask)
        c = LSH[impl](qk2, v2, m, n_hashes, padding_mask=mask_all, rotations=rot, dedup=dedup)
        assert (c[mask] - a[mask]).abs().max() > 1e-3


@both
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_no_nan_with_all_padding_rows(impl, dtype, causal):
    """A row with no real token at all: every output finite, in every function, and so are the
    gradients (LSH and local go through the hand-written backward)."""
    B, T, hs = 3, 16, 4
    qk, v, mask = make_inputs(B, T, hs, seed=2, dtype=torch.float32, pad=True)
    mask[1] = False                                            # an all-padding row
    qk, v = qk.to(dtype).requires_grad_(), v.to(dtype).requires_grad_()
    outs = {
        "lsh": LSH[impl](qk, v, 2, 3, causal=causal, padding_mask=mask),
        "lsh_dedup": LSH[impl](qk, v, 2, 3, causal=causal, padding_mask=mask, dedup=True),
        "local": LOCAL[impl](qk, qk, v, 4, causal=causal, padding_mask=mask),
        "local_shared": LOCAL[impl](qk, None, v, 4, causal=causal, padding_mask=mask,
                                        shared_qk=True),
        "full": full_attention(qk, qk, v, causal=causal, padding_mask=mask),
        "full_shared": full_attention(qk, None, v, causal=causal, padding_mask=mask,
                                      shared_qk=True),
    }
    for name, out in outs.items():
        assert out.dtype == dtype, name
        assert torch.isfinite(out).all(), name
        gq, gv = torch.autograd.grad(out.float().sum(), (qk, v))
        assert torch.isfinite(gq).all() and torch.isfinite(gv).all(), name


# -----------------------------------------------------------------------------------------------
# 4. Memory: no T x T tensor on the LSH path
# -----------------------------------------------------------------------------------------------

class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@both
@pytest.mark.parametrize("dedup", [False, True])
def test_lsh_path_has_no_T_by_T_tensor(impl, dedup):
    """Forward and backward of LSH attention never make a tensor of T * T elements. The largest
    are the logits (B, n_hashes, n_chunks, m, 2m) = 2 B n_hashes T m elements (n_hashes times
    that for dedup's counts) and the hash scores [xR; -xR] (B, n_hashes, T, n_buckets) =
    B n_hashes T^2 / m: quadratic in T for a fixed bucket_size, as in the paper (n_buckets = T / m), but n_hashes / m times smaller than T x T.
    Full attention, the control, does make T x T tensors (so the probe sees them, backward too)."""
    B, T, hs, m, n_hashes = 1, 512, 4, 4, 2
    qk, v, mask = make_inputs(B, T, hs, seed=0, dtype=torch.float32, pad=True)
    qk.requires_grad_()
    probe = LargestTensor()
    with probe:
        out = LSH[impl](qk, v, m, n_hashes, causal=True, padding_mask=mask, dedup=dedup)
        out.sum().backward()
    logits = 2 * B * n_hashes * T * m * (n_hashes if dedup else 1)
    hash_scores = B * n_hashes * T * (T // m)
    assert probe.largest <= max(logits, hash_scores) < T * T, probe.largest
    control = LargestTensor()
    with control:
        full_attention(qk, None, v, causal=True, padding_mask=mask, shared_qk=True).sum().backward()
    assert control.largest >= T * T


def test_reference_hash_scores_in_pieces_linear_in_T():
    """Part 1's hash_vectors scores 1024 positions at a time: at T = 4096 its largest tensor is a
    quarter of the whole (B, n_hashes, T, n_buckets) score tensor, and the buckets are the same
    as scoring everything at once."""
    B, T, hs, n_buckets, n_hashes = 1, 4096, 4, 512, 2
    x = torch.randn(B, T, hs)
    rot = torch.randn(B, hs, n_hashes, n_buckets // 2)
    probe = LargestTensor()
    with probe:
        buckets = hash_vectors(x, n_buckets, n_hashes, rot)
    xR = torch.einsum("bti,birk->brtk", x, rot)
    assert torch.equal(buckets, torch.cat([xR, -xR], dim=-1).argmax(dim=-1))
    assert probe.largest <= B * n_hashes * 1024 * n_buckets < B * n_hashes * T * n_buckets


@both
@settings(max_examples=15)
@given(B=st.integers(1, 2), nh=st.integers(1, 3), m=st.integers(1, 3), half=st.integers(1, 3),
       n_hashes=st.integers(1, 3), causal=st.booleans(), pad=st.booleans(), dedup=st.booleans(),
       per_row=st.booleans(), seed=st.integers(0, 2**16))
def test_heads_side_by_side_equal_heads_in_the_batch(impl, B, nh, m, half, n_hashes, causal, pad,
                                                     dedup, per_row, seed):
    """qk (B, T, nh, hs) is the same computation as (B * nh, T, hs) with the heads moved into the
    batch (row b * nh + h, the rotations' order): outputs and gradients agree exactly."""
    T, hs = 2 * half * m, 3
    qk, v, mask = make_inputs(B, T, nh * hs, seed=seed, pad=pad, hs_v=nh * 2)
    qk4, v4 = qk.view(B, T, nh, hs).requires_grad_(), v.view(B, T, nh, 2).requires_grad_()
    rot = make_rotations(B * nh, hs, n_hashes, T // m, seed, per_row=per_row)
    kw = dict(causal=causal, rotations=rot, dedup=dedup)
    out4 = LSH[impl](qk4, v4, m, n_hashes, padding_mask=mask, **kw)
    to_batch = lambda x: x.transpose(1, 2).reshape(B * nh, T, -1)
    qk3, v3 = to_batch(qk4.detach()).requires_grad_(), to_batch(v4.detach()).requires_grad_()
    mask3 = None if mask is None else mask.repeat_interleave(nh, dim=0)
    out3 = LSH[impl](qk3, v3, m, n_hashes, padding_mask=mask3, **kw)
    assert out4.shape == (B, T, nh, 2)
    torch.testing.assert_close(to_batch(out4), out3, rtol=0, atol=1e-12)
    g = torch.randn(B, T, nh, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    (out4 * g).sum().backward()
    (out3 * to_batch(g)).sum().backward()
    torch.testing.assert_close(to_batch(qk4.grad), qk3.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(to_batch(v4.grad), v3.grad, rtol=0, atol=1e-12)


# -----------------------------------------------------------------------------------------------
# 5. Gradients: the hand-written backwards (_ChunkAttention, _SortRows, _UnsortCombine, _Normalize)
# -----------------------------------------------------------------------------------------------

@both
@pytest.mark.parametrize("causal,pad,dedup,n_hashes", [
    (False, False, False, 3), (True, False, False, 3), (False, True, False, 3),
    (False, False, True, 3), (True, True, True, 3), (True, False, False, 1), (False, True, False, 1)])
def test_lsh_gradcheck(impl, causal, pad, dedup, n_hashes):
    """float64 gradcheck; with n_hashes = 3 the round combination (the lse gradient) matters,
    n_hashes = 1 takes the path without it. The rotations are fixed and the inputs' bucket
    margins are far above gradcheck's eps."""
    B, m, n_buckets, hs = 2, 2, 4, 3
    T = m * n_buckets
    qk, v, mask = make_inputs(B, T, hs, seed=5, pad=pad, hs_v=2)
    rot = make_rotations(B, hs, n_hashes, n_buckets, seed=5)
    f = lambda q_, v_: LSH[impl](q_, v_, m, n_hashes, causal=causal, padding_mask=mask,
                                     rotations=rot, dedup=dedup)
    assert torch.autograd.gradcheck(f, (qk.requires_grad_(), v.requires_grad_()))


@both
def test_lsh_gradcheck_with_dropout_replayed_by_seed(impl):
    """Dropout on the attention weights: the seed is reset inside the function, so every call
    draws the same mask and the function is deterministic; gradcheck then checks that backward
    uses the forward's mask and its 1 / (1 - p) rescaling."""
    B, m, n_buckets, hs, n_hashes = 1, 2, 4, 3, 2
    T = m * n_buckets
    qk, v, _ = make_inputs(B, T, hs, seed=6)
    rot = make_rotations(B, hs, n_hashes, n_buckets, seed=6)

    def f(q_, v_):
        torch.manual_seed(0)
        return LSH[impl](q_, v_, m, n_hashes, rotations=rot, dropout=0.4, training=True)

    assert torch.autograd.gradcheck(f, (qk.requires_grad_(), v.requires_grad_()))
    no_drop = LSH[impl](qk, v, m, n_hashes, rotations=rot)
    assert not torch.allclose(f(qk, v), no_drop), "dropout did nothing"
    torch.testing.assert_close(  # training=False: no dropout
        LSH[impl](qk, v, m, n_hashes, rotations=rot, dropout=0.4, training=False), no_drop)


@both
@pytest.mark.parametrize("fn", ["lsh", "local"])
def test_attention_dropout_is_unbiased(impl, fn):
    """Inverted dropout on the weights leaves the expected output equal to the output without
    dropout (the round weights come from the undropped lse). 4000 samples at once (batch rows
    with shared rotations); each element within 5 empirical standard errors."""
    N, m, n_buckets, hs, n_hashes = 4000, 2, 4, 3, 2
    T = m * n_buckets
    qk, v, _ = make_inputs(1, T, hs, seed=8)
    rot = make_rotations(1, hs, n_hashes, n_buckets, seed=8, per_row=False)
    if fn == "lsh":
        run = lambda q_, v_, **kw: LSH[impl](q_, v_, m, n_hashes, rotations=rot, **kw)
    else:
        run = lambda q_, v_, **kw: LOCAL[impl](q_, q_, v_, m, **kw)
    torch.manual_seed(0)
    samples = run(qk.expand(N, -1, -1), v.expand(N, -1, -1), dropout=0.3, training=True)
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(N)
    expected = run(qk, v)[0]
    assert se.min() > 0
    assert ((mean - expected).abs() <= 5 * se).all(), (mean - expected).abs().max()


@both
@pytest.mark.parametrize("causal,pad,shared", [(False, False, False), (True, True, False),
                                               (False, True, True), (True, False, True)])
def test_local_gradcheck(impl, causal, pad, shared):
    B, T, hs, m = 2, 6, 3, 2
    q, v, mask = make_inputs(B, T, hs, seed=9, pad=pad)
    k = torch.randn(B, T, hs, dtype=torch.float64, requires_grad=True)
    f = lambda q_, k_, v_: LOCAL[impl](q_, k_, v_, m, causal=causal, padding_mask=mask,
                                           shared_qk=shared)
    inputs = (q.requires_grad_(), k, v.requires_grad_())
    assert torch.autograd.gradcheck(f, inputs)


# -----------------------------------------------------------------------------------------------
# 6. Local and full attention against dense references
# -----------------------------------------------------------------------------------------------

@both
@settings(max_examples=20)
@given(B=st.integers(1, 2), m=st.integers(1, 4), nc=st.integers(1, 5), hs=st.integers(1, 5),
       causal=st.booleans(), pad=st.booleans(), shared=st.booleans(), seed=st.integers(0, 2**16))
def test_local_equals_banded_reference(impl, B, m, nc, hs, causal, pad, shared, seed):
    T = m * nc
    q, v, mask = make_inputs(B, T, hs, seed, pad=pad)
    k = torch.randn(B, T, hs, dtype=torch.float64)
    out = LOCAL[impl](q, k, v, m, causal=causal, padding_mask=mask, shared_qk=shared)
    ref = dense_reference(q, k, v, allowed_mask(B, T, causal, mask, bucket_size=m), shared)
    assert_close_real(out, ref, mask, atol=1e-10)


@settings(max_examples=20)
@given(B=st.integers(1, 2), T=st.integers(1, 12), hs=st.integers(1, 5), causal=st.booleans(),
       pad=st.booleans(), shared=st.booleans(), seed=st.integers(0, 2**16))
def test_full_equals_naive_reference(B, T, hs, causal, pad, shared, seed):
    """Non-shared: softmax(q k^T / sqrt(hs)) v; shared: keys q / |q|, own logit -1e5, and the
    k argument is ignored."""
    q, v, mask = make_inputs(B, T, hs, seed, pad=pad)
    k = torch.randn(B, T, hs, dtype=torch.float64)
    out = full_attention(q, None if shared else k, v, causal=causal, padding_mask=mask,
                         shared_qk=shared)
    ref = dense_reference(q, k, v, allowed_mask(B, T, causal, mask), shared)
    assert_close_real(out, ref, mask, atol=1e-10)
    if shared:
        torch.testing.assert_close(
            full_attention(q, k, v, causal=causal, padding_mask=mask, shared_qk=True), out)


@pytest.mark.parametrize("T", [1, 5, 17, 40])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pad", [False, True])
def test_full_fast_equals_explicit_path(T, causal, pad):
    """full_attention_fast (heads side by side, F.scaled_dot_product_attention, padding as an
    additive bias) equals Part 1's explicit masked softmax for separate keys, in float64: values
    and the gradients of q, k, v, on the rows that have a real key."""
    B, nh, hs = 3, 2, 4
    q, v, mask = make_inputs(B, T, nh * hs, seed=T, pad=pad)
    k = torch.randn(B, T, nh * hs, dtype=torch.float64)
    heads = lambda x: x.view(B, T, nh, hs).transpose(1, 2).detach().requires_grad_()
    q4, k4, v4 = heads(q), heads(k), heads(v)                          # (B, nh, T, hs)
    rows = lambda x: x.reshape(B * nh, T, hs)
    mask_rows = None if mask is None else mask.repeat_interleave(nh, 0)  # (B nh, T)
    fast = full_attention_fast(q4, k4, v4, causal=causal, padding_mask=mask)
    ref = full_attention(rows(q4), rows(k4), rows(v4), causal=causal,
                         padding_mask=mask_rows).view(B, nh, T, hs)
    real = torch.ones(B, 1, T, 1, dtype=torch.float64) if mask is None else \
        mask.view(B, 1, T, 1).double()    # under causal, a padded query may have no real key
    g = torch.randn(B, nh, T, hs, dtype=torch.float64) * real
    grads = [torch.autograd.grad((y * g).sum(), (q4, k4, v4)) for y in (fast, ref)]
    torch.testing.assert_close(fast * real, ref * real, atol=1e-10, rtol=1e-10)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    if pad and not mask.all():   # the mask matters: without it the result would differ
        unmasked = full_attention_fast(q4, k4, v4, causal=causal)
        assert not torch.allclose(unmasked * real, ref * real, atol=1e-6)


def test_fused_qkv_projection_equals_three_projections():
    """LSHSelfAttention._qkv: one x @ [W_q; W_k; W_v]^T matmul split into heads equals the three
    projections qk, k, v split into heads, values and weight gradients (float64)."""
    layer = make_layer("full", shared_qk=False).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    g = [torch.randn(2, 2, 5, 8, dtype=torch.float64) for _ in range(3)]
    heads = lambda y: y.view(2, 5, 2, 8).transpose(1, 2)                  # (B, nh, T, hs)
    grads = []
    for qkv in (layer._qkv(x), [heads(layer.qk(x)), heads(layer.k(x)), heads(layer.v(x))]):
        assert [tuple(y.shape) for y in qkv] == [(2, 2, 5, 8)] * 3
        w = [layer.qk.weight, layer.k.weight, layer.v.weight]
        grads.append((qkv, torch.autograd.grad(sum((y * gi).sum() for y, gi in zip(qkv, g)), w)))
    for a, b in zip([*grads[0][0], *grads[0][1]], [*grads[1][0], *grads[1][1]]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_layer_fast_full_attention_equals_reference_with_padding(causal):
    """The layer with separate keys: impl='fast' (one fused q/k/v projection, SDPA) and
    impl='reference' (three projections, Part 1) share a state dict and give the same outputs
    and parameter gradients in float64."""
    layers = {impl: make_layer("full", shared_qk=False, causal=causal, impl=impl).double()
              for impl in ("fast", "reference")}
    layers["reference"].load_state_dict(layers["fast"].state_dict())   # strict: same keys
    x = torch.randn(3, 9, 16, dtype=torch.float64)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 5:], mask[2, 2:4] = False, False
    out = {}
    for impl, layer in layers.items():
        y = layer(x, padding_mask=mask)
        (y[mask] ** 2).sum().backward()
        out[impl] = (y[mask], {n: p.grad for n, p in layer.named_parameters()})
    torch.testing.assert_close(out["fast"][0], out["reference"][0], atol=1e-10, rtol=1e-10)
    for name, grad in out["fast"][1].items():
        torch.testing.assert_close(grad, out["reference"][1][name], atol=1e-10, rtol=1e-10)


# The conventions of each full-attention kind, written out here (not read from the module), so
# that a change of lsh_attention.FULL_KINDS or of full_attention fails:
# (keys q / |q|, own logit -1e5, logits / sqrt(hs))
FULL_CONVENTIONS = {"full": (True, True, False), "full_scaled": (True, True, True),
                    "full_self": (True, False, False), "full_raw_keys": (False, True, False),
                    "full_dot": (False, False, True)}


def conventions_reference(q, v, allowed, unit_keys, mask_self, scaled):
    """softmax over the allowed keys of q . k (/ sqrt(hs)), k = q / |q| or q, own logit -1e5."""
    k = q / q.norm(dim=-1, keepdim=True) if unit_keys else q
    logits = q @ k.transpose(-1, -2) / (math.sqrt(q.shape[-1]) if scaled else 1.0)
    if mask_self:
        logits = logits.masked_fill(torch.eye(q.shape[1], dtype=torch.bool), SELF_LOGIT)
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1) @ v


@settings(max_examples=20)
@given(B=st.integers(1, 2), T=st.integers(1, 12), hs=st.integers(1, 5), causal=st.booleans(),
       pad=st.booleans(), seed=st.integers(0, 2**16))
def test_full_dot_equals_hand_written_softmax(B, T, hs, causal, pad, seed):
    """attn='full_dot', the authors' dot-product attention: softmax(q q^T / sqrt(hs)) v, keys not
    normalised, and a query may attend to itself (the causal mask keeps the diagonal). Without
    padding it runs the fused kernel, with padding the explicit path: both are checked."""
    q, v, mask = make_inputs(B, T, hs, seed, pad=pad)
    logits = q @ q.transpose(-1, -2) / math.sqrt(hs)          # (B, T, T)
    if causal:
        logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        logits = logits.masked_fill(~mask.view(B, 1, T), float("-inf"))
    want = torch.softmax(logits, dim=-1) @ v
    kind = FULL_KINDS["full_dot"]
    out = full_attention(q, None, v, causal=causal, padding_mask=mask, shared_qk=True, **kind)
    assert_close_real(out, want, mask, atol=1e-10)


@pytest.mark.parametrize("kind", list(FULL_CONVENTIONS))
def test_full_kinds_change_one_convention_each(kind):
    """Each full-attention kind of the layer is full attention with the conventions listed in
    FULL_CONVENTIONS: full_scaled, full_self and full_raw_keys differ from our shared-QK full
    attention in one convention each, full_dot in all three. Checked through the layer (same
    weights for every kind, causal, padded) against conventions_reference, and every kind but
    full gives outputs different from full's."""
    torch.manual_seed(0)
    B, T, C, nh = 2, 10, 8, 2
    layer = LSHSelfAttention(C, nh, bucket_size=4, n_hashes=1, causal=True, attn=kind).double()
    x = torch.randn(B, T, C, dtype=torch.float64)
    mask = torch.rand(B, T) < 0.8
    mask[:, 0] = True
    heads = lambda y: y.view(B, T, nh, C // nh).transpose(1, 2).reshape(B * nh, T, -1)
    q, v = heads(layer.qk(x)), heads(layer.v(x))
    allowed = allowed_mask(B * nh, T, True, mask.repeat_interleave(nh, dim=0))
    y = conventions_reference(q, v, allowed, *FULL_CONVENTIONS[kind])
    want = layer.out(y.view(B, nh, T, -1).transpose(1, 2).reshape(B, T, C))
    got = layer(x, padding_mask=mask)
    assert_close_real(got, want, mask, atol=1e-10)
    layer.attn = "full"
    if kind != "full":
        assert real_rows(layer(x, padding_mask=mask) - got, mask).abs().max() > 1e-3


def test_full_kinds_need_shared_qk():
    for kind in ("full_dot", "full_scaled", "full_self", "full_raw_keys"):
        with pytest.raises(ValueError, match=f"{kind!r} needs one vector per position"):
            LSHSelfAttention(8, 2, bucket_size=4, n_hashes=1, attn=kind, shared_qk=False)


@both
def test_shared_qk_logits_use_unit_keys(impl):
    """Step 3: logit(i, j) = q_i . q_j / |q_j|. Scaling q_j by s > 0 leaves k_hat_j, hence every
    other query's logits and outputs, unchanged; only query j's own output moves (its logits
    scale by s). With unnormalised keys every output would move."""
    q, v, _ = make_inputs(1, 6, 4, seed=3)
    q2 = q.clone()
    q2[0, 3] *= 9.0
    for fn in (lambda q_: full_attention(q_, None, v, shared_qk=True),
               lambda q_: LOCAL[impl](q_, None, v, 3, shared_qk=True),
               lambda q_: LSH[impl](q_, v, 3, 2, rotations=make_rotations(1, 4, 2, 2, 3))):
        a, b = fn(q), fn(q2)
        others = torch.arange(6) != 3
        torch.testing.assert_close(a[0, others], b[0, others], atol=1e-12, rtol=0)
        assert not torch.allclose(a[0, 3], b[0, 3])   # query 3 itself is sharper now


# -----------------------------------------------------------------------------------------------
# 7. Half precision
# -----------------------------------------------------------------------------------------------

@both
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["lsh", "lsh_dedup", "local_shared", "local", "full_shared",
                                  "full"])
def test_half_precision_keeps_dtype_and_equals_float32_rounded(impl, dtype, kind):
    """Half inputs (with masks): the output keeps the dtype and, since logits and softmax run in
    float32 (steps 5 and 7), it is the float32 computation on the same half-rounded inputs,
    rounded to half: equal to within one unit in the last place of the half type (the float32
    results may differ by reordering, which can move a value across a rounding boundary). Unit
    keys computed in half and then cast would be off by several units."""
    B, m, n_buckets, hs, n_hashes = 2, 4, 4, 8, 3
    T = m * n_buckets
    qk, v, mask = make_inputs(B, T, hs, seed=10, dtype=torch.float32, pad=True)
    k = torch.randn(B, T, hs)
    qk, k, v = qk.to(dtype), k.to(dtype), v.to(dtype)
    rot = make_rotations(B, hs, n_hashes, n_buckets, seed=10, dtype=torch.float32)

    def run(q_, k_, v_):
        if kind.startswith("lsh"):
            return LSH[impl](q_, v_, m, n_hashes, causal=True, padding_mask=mask, rotations=rot,
                                 dedup=kind == "lsh_dedup")
        fn, size = (local_attention, dict(bucket_size=m)) if kind.startswith("local") else \
            (full_attention, {})
        return fn(q_, k_, v_, causal=True, padding_mask=mask, shared_qk=kind.endswith("shared"),
                  **size)

    out = run(qk, k, v)
    ref = run(qk.float(), k.float(), v.float())
    assert out.dtype == dtype and ref.dtype == torch.float32
    assert (ref[mask].to(dtype).float() - ref[mask]).abs().max() > 0   # rounding is visible
    assert_close_real(out.float(), ref.to(dtype).float(), mask, atol=1e-6,
                      rtol=torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_full_attention_without_masks(dtype):
    """The unmasked non-shared path (PyTorch's fused kernel, which need not compute in float32):
    dtype kept, and within 8 units of the half type's epsilon of the float32 result."""
    q, v, _ = make_inputs(2, 16, 8, seed=12, dtype=torch.float32)
    k = torch.randn(2, 16, 8)
    for causal in (False, True):
        out = full_attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal)
        ref = full_attention(q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float(),
                             causal=causal)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, atol=8 * torch.finfo(dtype).eps, rtol=0)


# -----------------------------------------------------------------------------------------------
# 8. The multi-head layer
# -----------------------------------------------------------------------------------------------

def make_layer(attn, seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(d_model=16, n_heads=2, bucket_size=4, n_hashes=3)
    args.update(kw)
    return LSHSelfAttention(attn=attn, **args)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pad", [False, True])
def test_layer_lsh_and_full_share_state_dict_and_agree_at_two_buckets(causal, pad):
    lsh = make_layer("lsh", causal=causal)
    full = make_layer("full", seed=1, causal=causal)
    assert lsh.state_dict().keys() == full.state_dict().keys()
    full.load_state_dict(lsh.state_dict())                      # strict: the same parameters
    local = make_layer("local", seed=2, causal=causal)
    local.load_state_dict(lsh.state_dict())
    x = torch.randn(3, 8, 16)                                   # T == 2 * bucket_size
    mask = None
    if pad:
        mask = torch.rand(3, 8, generator=torch.Generator().manual_seed(0)) < 0.7
        mask[:, 0] = True
    a, b = lsh(x, padding_mask=mask), full(x, padding_mask=mask)
    assert a.shape == (3, 8, 16)
    assert_close_real(a, b, mask, atol=1e-5, rtol=1e-5)
    # the same module, switched to full attention by its attribute
    lsh.attn = "full"
    assert_close_real(lsh(x, padding_mask=mask), b, mask, atol=1e-6)
    # and non-causal local attention on the same weights is a different function (the first
    # chunk does not see the second), so agreement above is not automatic
    if not causal:
        assert not torch.allclose(real_rows(local(x, padding_mask=mask), mask),
                                  real_rows(b, mask), atol=1e-3)


def test_layer_non_shared_qk_adds_a_key_projection():
    full = make_layer("full", shared_qk=False)
    local = make_layer("local", seed=1, shared_qk=False)
    assert "k.weight" in full.state_dict() and "k.weight" not in make_layer("lsh").state_dict()
    local.load_state_dict(full.state_dict())
    x = torch.randn(2, 8, 16)
    # T == 2 * bucket_size: local attention's second chunk sees both chunks, the first only itself
    a, b = full(x), local(x)
    torch.testing.assert_close(a[:, 4:], b[:, 4:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["lsh", "full", "local"])
@pytest.mark.parametrize("causal", [False, True])
def test_layer_any_length(attn, causal):
    """Any T: padded internally, T positions back, finite. For T <= 2 * bucket_size the padded
    LSH layer sees everything, so it equals the full layer on the same weights."""
    layer = make_layer(attn, causal=causal)
    full = make_layer("full", causal=causal)
    full.load_state_dict(layer.state_dict())
    for T in (1, 3, 7, 8, 9, 13):
        x = torch.randn(2, T, 16)
        mask = torch.ones(2, T, dtype=torch.bool)
        mask[1, T // 2:] = False
        mask[1, 0] = True
        for m_ in (None, mask):
            y = layer(x, padding_mask=m_)
            assert y.shape == (2, T, 16) and torch.isfinite(y).all()
            if attn == "lsh" and T <= 8:
                assert_close_real(y, full(x, padding_mask=m_), m_, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["full", "local"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shared_qk", [True, False])
def test_layer_appended_padding_changes_nothing(attn, causal, shared_qk):
    """For full and local attention, a sequence gives the same outputs as the same sequence with
    extra padding-masked tokens appended, whatever those tokens are. (Not for LSH: the appended
    tokens are hashed and sorted too, which moves chunk boundaries.)"""
    layer = make_layer(attn, causal=causal, shared_qk=shared_qk)
    x = torch.randn(2, 10, 16)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 3] = False
    y = layer(x, padding_mask=mask)
    x2 = torch.cat([x, 5 * torch.randn(2, 7, 16)], dim=1)
    mask2 = torch.cat([mask, torch.zeros(2, 7, dtype=torch.bool)], dim=1)
    y2 = layer(x2, padding_mask=mask2)
    torch.testing.assert_close(y2[:, :10][mask], y[mask], atol=1e-5, rtol=1e-5)
    # padded inputs inside the sequence never matter either
    x3 = x.clone()
    x3[0, 3] = 100.0
    torch.testing.assert_close(layer(x3, padding_mask=mask)[mask], y[mask], atol=1e-5, rtol=1e-5)


def test_layer_lsh_causal_positive_scaling_of_future_inputs():
    """The LSH layer under causal masking: scaling future inputs by positive numbers scales their
    qk (a linear map without bias) and so keeps their buckets; with the same seed, earlier outputs
    do not move. Scaling by a negative number moves buckets, and is allowed to leak."""
    layer = make_layer("lsh", causal=True)
    x = torch.randn(2, 16, 16)
    x2 = x.clone()
    x2[:, 9:] *= torch.rand(2, 7, 1) * 4 + 0.1
    torch.manual_seed(3)
    a = layer(x)
    torch.manual_seed(3)
    b = layer(x2)
    torch.testing.assert_close(a[:, :9], b[:, :9], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("attn", ["lsh", "full", "local"])
def test_layer_dtypes_and_all_padding_rows(dtype, attn):
    layer = make_layer(attn)
    x = torch.randn(2, 11, 16)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1] = False                                            # all padding: still finite
    y = layer.to(dtype)(x.to(dtype), padding_mask=mask)
    assert y.dtype == dtype and y.shape == (2, 11, 16) and torch.isfinite(y).all()


# -----------------------------------------------------------------------------------------------
# 9. Bad input: ValueError naming the values and what would be valid
# -----------------------------------------------------------------------------------------------

@both
def test_bad_input_lsh_attention(impl):
    qk, v = torch.randn(2, 16, 4), torch.randn(2, 16, 3)
    with pytest.raises(ValueError, match=r"same B and T, got qk \(2, 16, 4\) and v \(2, 12, 3\)"):
        LSH[impl](qk, v[:, :12], 4, 2)
    with pytest.raises(ValueError, match=r"got qk \(16, 4\) and v \(2, 16, 3\)"):
        LSH[impl](qk[0], v, 4, 2)
    with pytest.raises(ValueError, match=r"T=16 must be a positive multiple of 2 \* bucket_size "
                                         r"= 12 \(n_buckets = T // bucket_size must be even\)"):
        LSH[impl](qk, v, 6, 2)                             # 16 // 6 buckets, not a multiple
    with pytest.raises(ValueError, match=r"T=12 must be a positive multiple of 2 \* bucket_size "
                                         r"= 8"):
        LSH[impl](qk[:, :12], v[:, :12], 4, 2)             # 3 buckets: odd
    with pytest.raises(ValueError, match=r"T=16 must be a positive multiple of 2 \* bucket_size "
                                         r"= 32"):
        LSH[impl](qk, v, 16, 2)                            # 1 bucket: too few
    with pytest.raises(ValueError, match=r"2 \* bucket_size = 0"):
        LSH[impl](qk, v, 0, 2)
    with pytest.raises(ValueError, match=r"n_hashes must be >= 1, got 0"):
        LSH[impl](qk, v, 4, 0)
    with pytest.raises(ValueError, match=r"padding_mask must be \(B, T\) = \(2, 16\), "
                                         r"got \(2, 8\)"):
        LSH[impl](qk, v, 4, 2, padding_mask=torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"rotations must have shape \(4, 2, 2\) or "
                                         r"\(2, 4, 2, 2\) .* got \(4, 2, 3\)"):
        LSH[impl](qk, v, 4, 2, rotations=torch.randn(4, 2, 3))


def test_bad_input_hash_vectors():
    x = torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match=r"n_buckets must be even and >= 2, got 3"):
        hash_vectors(x, 3, 1)
    with pytest.raises(ValueError, match=r"n_buckets must be even and >= 2, got 0"):
        hash_vectors(x, 0, 1)
    with pytest.raises(ValueError, match=r"n_hashes must be >= 1, got 0"):
        hash_vectors(x, 4, 0)
    with pytest.raises(ValueError, match=r"x must be \(B, T, hs\), got shape \(8, 4\)"):
        hash_vectors(x[0], 4, 1)
    with pytest.raises(ValueError, match=r"rotations must have shape \(4, 1, 2\) or "
                                         r"\(2, 4, 1, 2\) for x of shape \(2, 8, 4\), "
                                         r"got \(3, 4, 1, 2\)"):
        hash_vectors(x, 4, 1, torch.randn(3, 4, 1, 2))
    with pytest.raises(ValueError, match=r"with heads, qk must be \(B, T, nh, hs\) and v "
                                         r"\(B, T, nh, hs_v\) with the same B, T and nh, got qk "
                                         r"\(2, 8, 2, 4\) and v \(2, 8, 3, 4\)"):
        lsh_attention_heads(torch.randn(2, 8, 2, 4), torch.randn(2, 8, 3, 4), 2, 1)
    with pytest.raises(ValueError, match=r"qk must be \(B, T, hs\), got \(2, 8, 2, 4\); heads side by "
                                         r"side, \(B, T, nh, hs\), go through lsh_attention_heads"):
        lsh_attention(torch.randn(2, 8, 2, 4), torch.randn(2, 8, 2, 4), 2, 1)


def test_bad_input_layer():
    with pytest.raises(ValueError, match=r"shared_qk=False is valid only with attn='full' or "
                                         r"'local'"):
        LSHSelfAttention(16, 2, bucket_size=4, n_hashes=1, attn="lsh", shared_qk=False)
    with pytest.raises(ValueError, match=r"n_hashes must be >= 1, got 0"):
        LSHSelfAttention(16, 2, bucket_size=4, n_hashes=0)
    with pytest.raises(ValueError, match=r"bucket_size must be >= 1, got 0"):
        LSHSelfAttention(16, 2, bucket_size=0, n_hashes=1)
    with pytest.raises(ValueError, match=r"d_model=16 must be divisible by n_heads=3"):
        LSHSelfAttention(16, 3, bucket_size=4, n_hashes=1)
    with pytest.raises(ValueError, match=r"attn='flash', expected one of \('lsh', 'full', "
                                         r"'local', 'full_scaled', 'full_self', 'full_raw_keys', "
                                         r"'full_dot'\)"):
        LSHSelfAttention(16, 2, bucket_size=4, n_hashes=1, attn="flash")
    with pytest.raises(ValueError, match=r"impl='slow', expected one of \('fast', 'reference'\)"):
        LSHSelfAttention(16, 2, bucket_size=4, n_hashes=1, impl="slow")
    layer = LSHSelfAttention(16, 2, bucket_size=4, n_hashes=4)
    with pytest.raises(ValueError, match=r"padding_mask must be \(B, T\) = \(2, 5\), "
                                         r"got \(2, 4\)"):
        layer(torch.randn(2, 5, 16), padding_mask=torch.ones(2, 4, dtype=torch.bool))
    layer.n_hashes = 0                                          # checked again at forward time
    with pytest.raises(ValueError, match=r"n_hashes must be >= 1, got 0"):
        layer(torch.randn(2, 5, 16))


@both
def test_bad_input_local_attention_length(impl):
    q = torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match=r"T=10 must be a positive multiple of bucket_size=4"):
        LOCAL[impl](q, q, q, 4)
    with pytest.raises(ValueError, match=r"bucket_size=0"):
        LOCAL[impl](q, q, q, 0)
    with pytest.raises(ValueError, match=r"k is None, which is valid only with shared_qk=True"):
        full_attention(q, None, q)


@both
@pytest.mark.parametrize("fn", ["local", "full"])
@pytest.mark.parametrize("bad,shape", [("v_length", (2, 6, 4)), ("k_length", (2, 6, 4)),
                                       ("k_width", (2, 8, 3)), ("mask", (2, 6))])
def test_bad_input_shapes_local_and_full(impl, fn, bad, shape):
    """Shapes that do not match must give a ValueError naming the offending shape and the one it
    must match, as lsh_attention does, not a RuntimeError from inside a reshape or matmul."""
    q = k = v = torch.randn(2, 8, 4)
    mask = None
    if bad == "mask":
        mask = torch.ones(*shape, dtype=torch.bool)
    elif bad == "v_length":
        v = torch.randn(*shape)
    else:
        k = torch.randn(*shape)
    expected = r"\(2, 8\)" if bad == "mask" else r"\(2, 8, 4\)"
    offending = re.escape(str(shape))
    with pytest.raises(ValueError, match=rf"(?s)(?=.*{offending})(?=.*{expected})"):
        if fn == "local":
            LOCAL[impl](q, k, v, 2, padding_mask=mask)
        else:
            full_attention(q, k, v, padding_mask=mask)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("attn,shared_qk", [("lsh", True), ("local", True), ("local", False),
                                            ("full", True), ("full", False)])
def test_layer_under_autocast(attn, shared_qk, dtype):
    """Under torch.autocast the attention core still runs in float32 (the -1e5 self logit does
    not fit in float16) and gives the float32 result, rounded to the autocast dtype."""
    torch.manual_seed(0)
    layer = LSHSelfAttention(32, 4, bucket_size=4, n_hashes=2, causal=True, attn=attn,
                             shared_qk=shared_qk)
    x = torch.randn(2, 24, 32, requires_grad=True)
    torch.manual_seed(1)
    want = layer(x)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=dtype):
        got = layer(x)
    assert got.dtype == dtype
    got.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.05)


# -----------------------------------------------------------------------------------------------
# 10. The picture (python plot.py lsh_attention), and the module importing only torch
# -----------------------------------------------------------------------------------------------

def test_figure_is_drawn_and_matplotlib_only_imported_for_it(tmp_path):
    root = Path(__file__).resolve().parents[1]
    code = "import sys, lsh_attention; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=root)
    assert out.stdout.strip() == "False"
    path = tmp_path / "lsh.png"
    subprocess.run([sys.executable, "plot.py", "lsh_attention", "--out", str(path)], check=True,
                   cwd=root, capture_output=True)
    assert path.stat().st_size > 10_000
