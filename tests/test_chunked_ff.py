"""Tests for chunked_ff.py: chunked feed-forward and chunked cross-entropy equal the unchunked
computation (outputs and gradients) for every n_chunks, including counts that do not divide the
length or exceed it; dropout is replayed in the per-chunk recomputation; the (rows, d_ff) and
(rows, vocab) intermediates never exist whole, counted exactly; bad n_chunks is a ValueError.

Run: python -m pytest tests/test_chunked_ff.py        (a few seconds on two CPU cores)
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from chunked_ff import ChunkedFeedForward, chunked, chunked_cross_entropy



def grads_of(out, inputs):
    return list(torch.autograd.grad(out, inputs))


def assert_all_close(got, want, atol=1e-12):
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


# -----------------------------------------------------------------------------------------------
# chunked(fn, x, n_chunks, dim)
# -----------------------------------------------------------------------------------------------

@settings(max_examples=25)
@given(shape=st.lists(st.integers(1, 7), min_size=1, max_size=3), dim=st.integers(0, 2),
       n_chunks=st.integers(1, 10))
def test_chunked_equals_whole_and_splits_evenly(shape, dim, n_chunks):
    dim = dim % len(shape)
    x = torch.randn(*shape, dtype=torch.float64)
    sizes = []

    def fn(piece):                              # position-wise along dim
        sizes.append(piece.size(dim))
        return torch.sin(piece) * 2 + 1

    torch.testing.assert_close(chunked(fn, x, n_chunks, dim=dim), torch.sin(x) * 2 + 1,
                               rtol=0, atol=0)
    length = shape[dim]
    assert len(sizes) == min(n_chunks, length)  # more chunks than positions: one per position
    assert sum(sizes) == length and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, None, True])
def test_bad_n_chunks_is_a_value_error(bad):
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="n_chunks"):
        chunked(torch.sin, x, bad)
    with pytest.raises(ValueError, match="n_chunks"):
        ChunkedFeedForward(3, 8, n_chunks=bad)
    with pytest.raises(ValueError, match="n_chunks"):
        chunked_cross_entropy(x, torch.randn(5, 3), torch.zeros(2, 4, dtype=torch.long), bad)


def test_other_bad_input():
    with pytest.raises(ValueError, match="activation"):
        ChunkedFeedForward(3, 8, activation="swish")
    with pytest.raises(ValueError, match="rows"):
        chunked_cross_entropy(torch.randn(2, 4, 3), torch.randn(5, 3),
                              torch.zeros(7, dtype=torch.long), 2)


# -----------------------------------------------------------------------------------------------
# ChunkedFeedForward
# -----------------------------------------------------------------------------------------------

def reference_ff(ff, x):
    """The unchunked layer written out: W2 act(W1 x + b1) + b2 (no dropout)."""
    act = F.gelu if ff.activation == "gelu" else F.relu
    return F.linear(act(F.linear(x, ff.w1.weight, ff.w1.bias)), ff.w2.weight, ff.w2.bias)


@settings(max_examples=25)
@given(B=st.integers(1, 3), T=st.integers(1, 9), C=st.integers(1, 6), d_ff=st.integers(1, 12),
       n_chunks=st.integers(1, 12), activation=st.sampled_from(["gelu", "relu"]),
       seed=st.integers(0, 2**16))
def test_chunked_ff_equals_unchunked(B, T, C, d_ff, n_chunks, activation, seed):
    torch.manual_seed(seed)
    ff = ChunkedFeedForward(C, d_ff, n_chunks=n_chunks, activation=activation).double()
    x = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    inputs = [x] + list(ff.parameters())
    y, want_y = ff(x), reference_ff(ff, x)
    torch.testing.assert_close(y, want_y, rtol=0, atol=1e-12)
    w = torch.randn_like(y)                     # a random direction for the gradients
    assert_all_close(grads_of((y * w).sum(), inputs), grads_of((want_y * w).sum(), inputs))
    with torch.no_grad():                       # the inference path (no checkpoint)
        torch.testing.assert_close(ff(x), want_y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_chunks", [2, 3, 7])
def test_chunked_ff_dropout_is_replayed_in_backward(n_chunks):
    """With dropout, the per-chunk recomputation in backward must reuse the forward's masks:
    gradients equal plain autograd through the same chunks (no recomputation), same seed."""
    torch.manual_seed(0)
    ff = ChunkedFeedForward(4, 16, n_chunks=n_chunks, dropout=0.3, activation="relu").double()
    x = torch.randn(2, 7, 4, dtype=torch.float64, requires_grad=True)
    inputs = [x] + list(ff.parameters())
    results = []
    for fn in (ff, lambda x: chunked(ff.ff, x, n_chunks)):   # checkpointed, plain
        torch.manual_seed(1)
        y = fn(x)
        results.append([y] + grads_of((y * y).sum(), inputs))
    assert_all_close(results[0], results[1])
    ff.eval()
    assert (ff(x) - results[0][0]).abs().max() > 1e-3   # dropout was on in training mode


# -----------------------------------------------------------------------------------------------
# chunked_cross_entropy
# -----------------------------------------------------------------------------------------------

@settings(max_examples=25)
@given(shape=st.sampled_from([(7,), (2, 5), (3, 4), (1, 9)]), C=st.integers(1, 5),
       V=st.integers(2, 12), n_chunks=st.integers(1, 12), bias=st.booleans(),
       p_ignore=st.sampled_from([0.0, 0.3, 1.0]), eps=st.sampled_from([0.0, 0.1]),
       seed=st.integers(0, 2**16))
def test_chunked_cross_entropy_equals_unchunked(shape, C, V, n_chunks, bias, p_ignore, eps, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, C, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, C, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    targets = torch.randint(0, V, shape, generator=g)
    targets[torch.rand(shape, generator=g) < p_ignore] = -100
    inputs = [t for t in (hidden, weight, b) if t is not None]

    loss = chunked_cross_entropy(hidden, weight, targets, n_chunks, bias=b, label_smoothing=eps)
    logits = F.linear(hidden, weight, b).reshape(-1, V)
    want = F.cross_entropy(logits, targets.reshape(-1), ignore_index=-100, label_smoothing=eps)
    # all targets ignored: NaN, like F.cross_entropy (0 / 0); the gradients are then zero
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-12, equal_nan=True)
    assert_all_close(grads_of(loss, inputs), grads_of(want, inputs))


def test_chunked_cross_entropy_under_autocast():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 8, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 40, (2, 8), generator=g)
    results = []
    for n_chunks in (1, 3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = chunked_cross_entropy(hidden, weight, targets, n_chunks)
        results.append([loss] + grads_of(loss, [hidden, weight]))
    assert results[1][0].dtype == results[0][0].dtype == torch.float32
    for a, b in zip(results[1], results[0]):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


# -----------------------------------------------------------------------------------------------
# Memory: the largest intermediate, over every op of forward and backward
# -----------------------------------------------------------------------------------------------

class LargestRows(TorchDispatchMode):
    """Records, over every op run (forward, backward and recomputation), the most rows of any
    output whose last dim is `width`: rows = numel / width. Shapes in `skip` (weights and their
    transposes, which also end in `width`) are not intermediates and are left out."""

    def __init__(self, width, skip):
        super().__init__()
        self.width, self.skip, self.rows = width, {tuple(s) for s in skip}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if (isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.width
                    and tuple(t.shape) not in self.skip):
                self.rows = max(self.rows, t.numel() // self.width)
        return out


@pytest.mark.parametrize("n_chunks", [1, 3, 4])
def test_ff_hidden_never_exists_whole(n_chunks):
    B, T, C, d_ff = 2, 12, 3, 20
    ff = ChunkedFeedForward(C, d_ff, n_chunks=n_chunks, dropout=0.1).double()
    x = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    with LargestRows(d_ff, skip=[(C, d_ff), (d_ff, C)]) as mode:
        ff(x).sum().backward()
    assert mode.rows == B * math.ceil(T / n_chunks)   # one piece: (B, T / n_chunks, d_ff)


@pytest.mark.parametrize("n_chunks", [1, 4, 5])
def test_logits_never_exist_whole(n_chunks):
    N, C, V = 24, 3, 50
    hidden = torch.randn(N, C, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, C, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    with LargestRows(V, skip=[(C, V), (V, C)]) as mode:
        chunked_cross_entropy(hidden, weight, targets, n_chunks).backward()
    assert mode.rows == math.ceil(N / n_chunks)       # one piece of the logits: (N / n, V)


def saved_shapes(fn):
    """Shapes of the tensors autograd saves for backward while fn runs."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return shapes, out


@pytest.mark.parametrize("n_chunks", [1, 4])
def test_chunks_keep_only_their_inputs_for_backward(n_chunks):
    """The largest-tensor tests above would also pass with plain chunking, whose pieces are each
    small but all stay saved for backward. Here: with n_chunks > 1 nothing of width d_ff or V is
    saved (the pieces are recomputed in backward); with n_chunks = 1 the usual activations are."""
    B, T, C, d_ff, V = 2, 12, 3, 20, 50
    ff = ChunkedFeedForward(C, d_ff, n_chunks=n_chunks, dropout=0.1).double()
    x = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    ff_shapes, _ = saved_shapes(lambda: ff(x))
    weight = torch.randn(V, C, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T))
    ce_shapes, _ = saved_shapes(lambda: chunked_cross_entropy(x, weight, targets, n_chunks))
    wide_ff = [s for s in ff_shapes if s[-1:] == (d_ff,) and s != (C, d_ff)]
    wide_ce = [s for s in ce_shapes if s[-1:] == (V,) and s != (C, V)]
    if n_chunks == 1:
        assert (B, T, d_ff) in wide_ff and (B * T, V) in wide_ce
    else:
        assert wide_ff == [] and wide_ce == []
