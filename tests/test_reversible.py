"""Tests for reversible.py: the inverse, gradients equal to ordinary backprop (dropout and LSH
attention inside the blocks), RNG replay, autocast, gradient accumulation, saved-activation memory
that does not grow with depth, and two-process DistributedDataParallel (gloo, CPU).

Run: python -m pytest tests/test_reversible.py        (about 8 s on two CPU cores; most of it
is starting the two DDP processes)
The reference for every gradient is the same blocks under ordinary autograd (Switchable with reversible=False).
"""
import contextlib
import os
import socket
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from hypothesis import given, settings, strategies as st
from torch.nn.parallel import DistributedDataParallel as DDP

import reversible
from conftest import plain_forward
from reversible import ReversibleBlock, ReversibleSequence



class Branch(nn.Module):
    """A small F or G: dropout(tanh(W x + b)), zeroed at padding positions if given a mask."""

    def __init__(self, C, p=0.0):
        super().__init__()
        self.lin, self.drop = nn.Linear(C, C), nn.Dropout(p)

    def forward(self, x, padding_mask=None, memory=None):
        # memory (B, S, C) stands in for the encoder output that cross-attention reads
        context = 0 if memory is None else torch.sin(memory).sum(1, keepdim=True)   # (B, 1, C)
        h = self.drop(torch.tanh(self.lin(x) + context))       # (B, T, C)
        return h if padding_mask is None else h * padding_mask.unsqueeze(-1)


class Switchable(ReversibleSequence):
    """A ReversibleSequence; with reversible=False the same blocks run in a plain loop under
    ordinary autograd: the reference for every gradient."""
    reversible = True

    def forward(self, x1, x2, **kwargs):
        if self.reversible:
            return super().forward(x1, x2, **kwargs)
        return plain_forward(self, x1, x2, **kwargs)


def stack(blocks, reversible=True):
    seq = Switchable(blocks)
    seq.reversible = reversible
    return seq


def make_seq(depth, C, p=0.0, seed=0, reversible=True):
    torch.manual_seed(seed)
    blocks = [ReversibleBlock(Branch(C, p), Branch(C, p)) for _ in range(depth)]
    return stack(blocks, reversible).double()


def make_inputs(B, T, C, seed=0, mask=False):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    x2 = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    padding_mask = (torch.rand(B, T, generator=g) > 0.3).double() if mask else None
    return x1, x2, padding_mask


def loss_fn(y1, y2):
    return (y1 * y2).sum() + y1.sum()   # uses both halves, with gradients that depend on both


def outputs_and_grads(seq, x1, x2, seed, **kwargs):
    """[y1, y2, dL/dx1, dL/dx2, dL/dparam for every parameter], one forward and backward."""
    x1, x2 = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    seq.zero_grad(set_to_none=True)
    torch.manual_seed(seed)                 # the same dropout / rotation draws for both paths
    y1, y2 = seq(x1, x2, **kwargs)
    loss_fn(y1, y2).backward()
    return [y1.detach(), y2.detach(), x1.grad, x2.grad] + [p.grad for p in seq.parameters()]


def assert_all_close(got, want, atol):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=atol)


def rev_vs_plain(seq, x1, x2, seed, **kwargs):
    seq.reversible = False
    want = outputs_and_grads(seq, x1, x2, seed, **kwargs)
    seq.reversible = True
    got = outputs_and_grads(seq, x1, x2, seed, **kwargs)
    return got, want


# -----------------------------------------------------------------------------------------------
# The inverse and the gradients
# -----------------------------------------------------------------------------------------------

@settings(max_examples=15)
@given(depth=st.integers(1, 8), B=st.integers(1, 3), T=st.integers(1, 6), C=st.integers(1, 6),
       mask=st.booleans(), seed=st.integers(0, 2**16))
def test_inverse_of_forward_is_identity(depth, B, T, C, mask, seed):
    seq = make_seq(depth, C, seed=seed)
    x1, x2, padding_mask = make_inputs(B, T, C, seed, mask)
    with torch.no_grad():
        y1, y2 = seq(x1, x2, padding_mask=padding_mask)
        z1, z2 = y1, y2
        for block in reversed(seq.blocks):
            z1, z2 = block.inverse(z1, z2, padding_mask=padding_mask)
    assert not torch.equal(y2, x2)             # the blocks did something (G is never masked)
    torch.testing.assert_close(z1, x1, rtol=0, atol=1e-12)
    torch.testing.assert_close(z2, x2, rtol=0, atol=1e-12)


@settings(max_examples=15)
@given(depth=st.integers(1, 5), B=st.integers(1, 3), T=st.integers(1, 6), C=st.integers(1, 6),
       p=st.sampled_from([0.0, 0.1, 0.5]), mask=st.booleans(), seed=st.integers(0, 2**16))
def test_gradients_equal_ordinary_backprop(depth, B, T, C, p, mask, seed):
    seq = make_seq(depth, C, p, seed)
    x1, x2, padding_mask = make_inputs(B, T, C, seed, mask)
    got, want = rev_vs_plain(seq, x1, x2, seed, padding_mask=padding_mask)
    assert_all_close(got, want, atol=1e-10)


def test_broken_rng_replay_gives_wrong_gradients(monkeypatch):
    """The replay matters: recomputing with fresh dropout masks changes the gradients."""
    seq = make_seq(3, 6, p=0.5)
    x1, x2, _ = make_inputs(2, 5, 6)
    monkeypatch.setattr(reversible, "_replay_rng", lambda state, devices: contextlib.nullcontext())
    got, want = rev_vs_plain(seq, x1, x2, seed=0)
    assert max((a - b).abs().max().item() for a, b in zip(got[2:], want[2:])) > 1e-3


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_lsh_attention_as_f(device):
    """Multi-round LSH attention (fresh random rotations every call, per head) with attention
    dropout as F, a chunked feed-forward with dropout as G: gradients equal ordinary backprop.
    On CUDA this checks that the CUDA RNG state is replayed too."""
    from chunked_ff import ChunkedFeedForward
    from lsh_attention import LSHSelfAttention
    B, T, C = 2, 14, 8                       # T is padded to a multiple of 2 * bucket_size inside
    for causal, mask in [(False, False), (True, True)]:
        torch.manual_seed(0)
        blocks = [ReversibleBlock(LSHSelfAttention(C, n_heads=2, bucket_size=2, n_hashes=3,
                                                   causal=causal, dropout=0.2),
                                  ChunkedFeedForward(C, 2 * C, n_chunks=3, dropout=0.2))
                  for _ in range(2)]
        seq = ReversibleSequence(blocks).double().to(device)
        x1, x2, padding_mask = (None if t is None else t.to(device)
                                for t in make_inputs(B, T, C, seed=1, mask=mask))
        got, want = rev_vs_plain(seq, x1, x2, seed=3, padding_mask=padding_mask)
        assert_all_close(got, want, atol=1e-10)
        # the draws matter: another seed gives other rotations and masks, so other outputs
        other = outputs_and_grads(seq, x1, x2, seed=4, padding_mask=padding_mask)
        assert (other[0] - got[0]).abs().max() > 1e-3


def test_shared_and_frozen_parameters():
    """A block used twice (weight sharing) and a frozen parameter: gradients still exact."""
    torch.manual_seed(0)
    a, b = ReversibleBlock(Branch(4, 0.2), Branch(4, 0.2)), ReversibleBlock(Branch(4), Branch(4))
    b.g.lin.bias.requires_grad_(False)
    seq = ReversibleSequence([a, b, a]).double()
    x1, x2, _ = make_inputs(2, 3, 4)
    got, want = rev_vs_plain(seq, x1, x2, seed=5)
    assert_all_close(got, want, atol=1e-10)
    assert b.g.lin.bias.grad is None


def test_gradient_accumulation_and_two_forwards_one_backward():
    seq = make_seq(3, 5, p=0.3)
    batches = [make_inputs(2, 4, 5, seed=s)[:2] for s in (1, 2)]
    grads = {}
    for rev in (False, True):
        seq.reversible = rev
        seq.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        for x1, x2 in batches:              # micro-batches: backward after each, .grad adds up
            loss_fn(*seq(x1.requires_grad_(), x2)).backward()
        losses = [loss_fn(*seq(x1, x2)) for x1, x2 in batches]   # two graphs alive at once
        sum(losses).backward()
        grads[rev] = [p.grad for p in seq.parameters()]
    assert_all_close(grads[True], grads[False], atol=1e-10)


def test_backward_leaves_outer_rng_stream_alone():
    seq = make_seq(2, 4, p=0.5)
    x1, x2, _ = make_inputs(2, 3, 4)
    torch.manual_seed(0)
    loss_fn(*seq(x1.requires_grad_(), x2)).backward()
    after_backward = torch.rand(5)
    torch.manual_seed(0)
    with torch.no_grad():
        seq(x1, x2)                          # the same draws, no backward
    assert torch.equal(after_backward, torch.rand(5))


# -----------------------------------------------------------------------------------------------
# Autocast, eval / no_grad, misuse
# -----------------------------------------------------------------------------------------------

class DtypeRecorder(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.dtypes = inner, []

    def forward(self, x, **kwargs):
        out = self.inner(x, **kwargs)
        self.dtypes.append(out.dtype)
        return out


def test_recomputation_runs_under_the_forward_autocast_state():
    torch.manual_seed(0)
    blocks = [ReversibleBlock(DtypeRecorder(Branch(8, 0.1)), DtypeRecorder(Branch(8, 0.1)))
              for _ in range(2)]
    seq = stack(blocks)
    x1, x2 = (t.float() for t in make_inputs(2, 5, 8)[:2])
    grads = {}
    for rev in (False, True):
        seq.reversible = rev
        seq.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y1, y2 = seq(x1, x2)
        loss_fn(y1, y2).backward()           # outside autocast, as in a training loop
        grads[rev] = [p.grad for p in seq.parameters()]
    for block in blocks:                      # 1 plain + 1 forward + 1 recomputation each
        assert block.f.dtypes == [torch.bfloat16] * 3 and block.g.dtypes == [torch.bfloat16] * 3
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_no_grad_eval_and_frozen_are_a_plain_forward(monkeypatch):
    """Nothing to backprop: the plain loop (no Function, no RNG states), the same outputs."""
    seq = make_seq(3, 4, p=0.5)
    x1, x2, _ = make_inputs(2, 3, 4)

    def run(rev, train=True, grad=False):
        seq.reversible = rev
        seq.train(train)
        torch.manual_seed(0)
        with torch.set_grad_enabled(grad):
            return seq(x1, x2)

    want = [run(False), run(False, train=False)]

    class NoFunction:
        def apply(*args):
            raise AssertionError("the reversible Function ran with nothing to backprop")

    monkeypatch.setattr(reversible, "_ReversibleFunction", NoFunction)
    seq.requires_grad_(False)                 # frozen and no input requiring grad
    got = [run(True), run(True, train=False), run(True, grad=True)]
    for (a1, a2), (b1, b2) in zip(got, want + want[:1]):
        assert a1.grad_fn is None and torch.equal(a1, b1) and torch.equal(a2, b2)
    # Eval mode with gradients on: the plain loop under ordinary autograd, exact gradients.
    seq.requires_grad_(True)
    y1, y2 = run(True, train=False, grad=True)
    assert y1.grad_fn is not None and torch.equal(y1, want[1][0])


def test_keyword_input_that_requires_grad_gets_its_gradient():
    """The encoder output of an encoder-decoder enters every decoder block's F as a keyword
    argument; its gradient (summed over blocks) must equal ordinary backprop's, dropout on."""
    seq = make_seq(3, 4, p=0.3)
    x1, x2, mask = make_inputs(2, 3, 4, mask=True)
    memory = torch.randn(2, 5, 4, dtype=torch.float64)

    def run(reversible):
        seq.reversible = reversible
        m = memory.clone().requires_grad_()
        got = outputs_and_grads(seq, x1, x2, 7, padding_mask=mask, memory=m)
        return got + [m.grad]

    want, got = run(False), run(True)
    assert want[-1] is not None and want[-1].abs().sum() > 0
    assert_all_close(got, want, atol=1e-10)


def test_misuse_is_reported():
    seq = make_seq(2, 4)
    x1, x2, mask = make_inputs(2, 3, 4, mask=True)
    y1, y2 = seq(x1, x2)
    with torch.no_grad():
        seq.blocks[0].f.lin.weight.add_(1.0)   # e.g. optimizer.step() before backward
    with pytest.raises(RuntimeError, match="modified in place"):
        loss_fn(y1, y2).backward()


# -----------------------------------------------------------------------------------------------
# Memory: bytes saved for backward, counted exactly
# -----------------------------------------------------------------------------------------------

def saved_activation_bytes(seq, x1, x2, **kwargs):
    """Bytes of the distinct storages autograd saves for backward during seq's forward pass.
    Parameters (and views of them, like W.t() saved by a Linear) are not activations: skipped."""
    param_storages = {p.untyped_storage().data_ptr() for p in seq.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = seq(x1.requires_grad_(), x2, **kwargs)   # keeps the graph (and storages) alive
    del out
    return sum(saved.values())


def test_saved_memory_is_flat_in_depth_for_reversible_and_linear_for_plain():
    """Counted: tensors saved for backward. Not counted: the two recorded RNG states per block
    (5 KB each on CPU, kept on the autograd node, independent of B and T)."""
    B, T, C = 2, 8, 16
    x1, x2, mask = make_inputs(B, T, C, mask=True)
    rev, plain = {}, {}
    for depth in (1, 2, 4, 12):
        rev[depth] = saved_activation_bytes(make_seq(depth, C, p=0.1), x1, x2, padding_mask=mask)
        plain[depth] = saved_activation_bytes(make_seq(depth, C, p=0.1, reversible=False),
                                              x1, x2, padding_mask=mask)
    assert rev[12] <= rev[2] and rev[12] == 2 * B * T * C * 8    # y1 and y2 of the last block
    per_block = plain[2] - plain[1]
    assert per_block > 0 and plain[12] - plain[2] == 10 * per_block   # exactly linear
    assert plain[4] - plain[2] == 2 * per_block


# -----------------------------------------------------------------------------------------------
# Two processes with DistributedDataParallel (gloo) == one process on the combined batch
# -----------------------------------------------------------------------------------------------

WORLD, ROWS = 2, 4          # 4 rows per micro-batch, each rank takes 2; two micro-batches


def _ddp_model(reversible=True):
    torch.manual_seed(7)
    a, b = ReversibleBlock(Branch(6), Branch(6)), ReversibleBlock(Branch(6), Branch(6))
    return stack([a, b, a], reversible).double()   # a twice: weight sharing


def _ddp_data():
    """Two micro-batches of (x1, x2, padding_mask), each with ROWS rows."""
    return [make_inputs(ROWS, 5, 6, seed=s, mask=True) for s in (11, 12)]


def _ddp_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        grads = []
        for find_unused in (False, True):
            model = DDP(_ddp_model(), find_unused_parameters=find_unused)
            rows = slice(rank * ROWS // WORLD, (rank + 1) * ROWS // WORLD)
            for i, (x1, x2, mask) in enumerate(_ddp_data()):
                # gradient accumulation: the first micro-batch stays local (no_sync), the second
                # backward all-reduces the sum; DDP averages over ranks
                with contextlib.nullcontext() if i == 1 else model.no_sync():
                    y1, y2 = model(x1[rows].requires_grad_(), x2[rows], padding_mask=mask[rows])
                    (loss_fn(y1, y2) / y1[..., 0].numel()).backward()   # mean over own rows
            grads.append([p.grad for p in model.module.parameters()])
        torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_one_process():
    """With a block used twice and with find_unused_parameters=True: the two settings where a
    backward that calls .backward() per block (params invisible to the outer graph) fails."""
    model = _ddp_model(reversible=False)      # reference: ordinary autograd, one process
    for x1, x2, mask in _ddp_data():
        y1, y2 = model(x1.requires_grad_(), x2, padding_mask=mask)
        (loss_fn(y1, y2) / y1[..., 0].numel()).backward()   # mean over all ROWS rows
    want = [p.grad for p in model.parameters()]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_ddp_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=True)
        per_rank = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]
    for got in per_rank:                       # after the all-reduce every rank holds the mean
        for grads in got:                      # find_unused_parameters False, True
            assert_all_close(grads, want, atol=1e-10)
