"""
Reversible residual layers: Section 3 ("Reversible Transformer") of the Reformer paper
(Kitaev, Kaiser, Levskaya, "Reformer: The Efficient Transformer", ICLR 2020, arXiv 2001.04451),
which takes them from RevNets (Gomez et al., "The Reversible Residual Network", NeurIPS 2017).

Checked against ordinary backpropagation through the same blocks (a plain loop over them) in
tests/test_reversible.py: equal gradients to 1e-10 in float64 with dropout and multi-round LSH
attention inside the blocks, under gradient accumulation, under autocast, and across two processes
with DistributedDataParallel. Imports only torch and the standard library: paste it anywhere.

The idea. A residual layer y = x + F(x) must keep x for backprop, so n layers keep n activations.
A reversible layer splits the activations into two halves and computes

    y1 = x1 + F(x2)          y2 = x2 + G(y1)

whose inputs can be computed back from its outputs:

    x2 = y2 - G(y1)          x1 = y1 - F(x2)

So backprop needs only the last layer's outputs. Walking down from the top, each layer rebuilds its
inputs, recomputes F and G on them, and backpropagates through that one layer. Activation memory
no longer grows with depth (paper Table 3); the price is one more forward pass of every F and G.
In the Reformer F is attention (it gets the padding mask) and G the feed-forward layer. In an
encoder-decoder, the decoder's F also gets the encoder output (cross-attention): a keyword argument
that requires grad is an input of the stack like x1 and x2, and gets its gradient, summed over
the blocks that read it.

Shape legend: B batch, T time, C channels (d_model). x1, x2, y1, y2 are all (B, T, C).

Public names:
    ReversibleBlock(f, g)                      one layer: forward(x1, x2, **kw) -> (y1, y2),
                                               inverse(y1, y2, **kw) -> (x1, x2)
    ReversibleSequence(blocks)                 the stack: forward(x1, x2, **kw) -> (y1, y2)

What a recomputing backward must get right, and how this file does it:
 1. Randomness. Dropout masks and LSH rotations are drawn from the global RNG. The recomputation
    must draw exactly the same numbers, or the rebuilt inputs and the gradients are wrong. Like
    torch.utils.checkpoint, we save the CPU RNG state (and the CUDA state of the devices the inputs
    live on) right before F and right before G of every block, and restore it around their
    recomputation. Every draw inside F and G is replayed, whatever it is and however many heads or
    hash rounds draw. The alternative, handing each call an explicit seed, would need every layer
    to accept a generator; saving the state works with any module. Cost: two CPU states (5 KB each)
    per block, independent of B and T. The state outside is restored afterwards, so backward never
    rewinds the RNG stream of the training loop.
 2. Autocast. The recomputation runs under the autocast settings in force during the forward pass
    (recorded per device type, like torch.utils.checkpoint), so it computes the same values in the
    same dtypes even though backward usually runs outside the autocast region.
 3. DistributedDataParallel and gradient accumulation. Earlier implementations (reformer-pytorch
    #19, transformers #7160) called .backward() on each recomputed layer inside the backward pass,
    with the parameters invisible to the outer graph. DDP's per-parameter hook then fires once per
    inner backward that touches the parameter (twice for a parameter shared by two layers), and
    with find_unused_parameters=True DDP has already marked every parameter unused after the
    forward pass: both end in "Expected to mark a variable ready only once". Here the parameters
    are explicit inputs of one autograd.Function; its backward gets their gradients with
    torch.autograd.grad (which does not touch .grad), sums them over blocks and returns them.
    Autograd then accumulates each parameter's gradient exactly once per backward, as for any
    other layer, so DDP, gradient accumulation and no_sync() behave as usual.
"""
import contextlib

import torch
import torch.nn as nn


class ReversibleBlock(nn.Module):
    """One reversible layer. f gets the keyword arguments (a padding mask); g does not."""

    def __init__(self, f, g):
        super().__init__()
        self.f, self.g = f, g

    def forward(self, x1, x2, **kwargs):
        # y1 = x1 + F(x2);  y2 = x2 + G(y1)
        y1 = x1 + self.f(x2, **kwargs)
        y2 = x2 + self.g(y1)
        return y1, y2

    def inverse(self, y1, y2, **kwargs):
        # x2 = y2 - G(y1);  x1 = y1 - F(x2)
        x2 = y2 - self.g(y1)
        x1 = y1 - self.f(x2, **kwargs)
        return x1, x2


class ReversibleSequence(nn.Module):
    """A stack of ReversibleBlocks. forward(x1, x2, **kwargs) -> (y1, y2), all (B, T, C).

    In training it keeps only the last block's outputs for backward and recomputes the rest. In
    eval mode, and with nothing to backprop (torch.no_grad(), or no input or parameter requiring
    grad), it is a plain loop: nothing is saved for a reversible backward. (In eval mode with
    gradients on, ordinary autograd then gives exact gradients, at ordinary memory.) The paper's
    ablation against ordinary residual layers (Figure 3, right) is model.py's, not this class's.
    """

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x1, x2, **kwargs):
        params = _trainable_params(self.blocks)
        needs_backward = torch.is_grad_enabled() and (x1.requires_grad or x2.requires_grad
                                                      or len(params) > 0)
        if not (self.training and needs_backward and len(self.blocks) > 0):
            for block in self.blocks:
                x1, x2 = block(x1, x2, **kwargs)
            return x1, x2
        # Keyword tensors that require grad (the encoder output read by cross-attention) go in
        # as inputs, like the parameters, so autograd routes their gradients through this node;
        # the rest (masks) are constants.
        names = [k for k, v in kwargs.items() if torch.is_tensor(v) and v.requires_grad]
        consts = {k: v for k, v in kwargs.items() if k not in names}
        return _ReversibleFunction.apply(self.blocks, consts, names, x1, x2,
                                         *[kwargs[k] for k in names], *params)


def _trainable_params(blocks):
    """Parameters that need gradients, each once (a block may appear twice: weight sharing)."""
    return [p for p in blocks.parameters() if p.requires_grad]


class _ReversibleFunction(torch.autograd.Function):
    """apply(blocks, consts, names, x1, x2, *inputs, *params) -> (y1, y2), saving only (y1, y2)
    and the keyword inputs for backward.

    The blocks get the keyword arguments consts plus dict(zip(names, inputs)); inputs are the
    keyword tensors that need gradients. params must be _trainable_params(blocks), in that order:
    forward runs the blocks, which use them, and backward returns their gradients.
    """

    @staticmethod
    def forward(ctx, blocks, consts, names, x1, x2, *inputs_and_params):
        inputs = inputs_and_params[:len(names)]
        params = inputs_and_params[len(names):]
        kwargs = {**consts, **dict(zip(names, inputs))}
        ctx.blocks, ctx.consts, ctx.names = blocks, consts, names
        ctx.devices = sorted({t.get_device() for t in (x1, x2) if t.is_cuda})
        ctx.autocast = _autocast_state({"cpu", x1.device.type})
        # Parameters stay reachable through ctx.blocks; they are not activations, so they are not
        # saved. Their versions are, to catch an optimizer step taken before this backward.
        ctx.versions = [p._version for p in params]
        ctx.rng = []                                   # per block: (state before F, before G)
        for block in blocks:                           # runs without a graph (no_grad)
            y1, y2, rng = _forward_recording(block, x1, x2, kwargs, ctx.devices)
            ctx.rng.append(rng)
            x1, x2 = y1, y2
        ctx.save_for_backward(y1, y2, *inputs)         # (B, T, C) each: all we keep
        return y1, y2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy1, dy2):
        params = _trainable_params(ctx.blocks)
        if [p._version for p in params] != ctx.versions:
            raise RuntimeError("ReversibleSequence: a parameter was modified in place between "
                               "forward and backward; the recomputation would use the new value")
        index = {id(p): i for i, p in enumerate(params)}
        grads = [None] * len(params)
        # Detached: the saved outputs still point at this node, and a graph through it would make
        # the recomputation below call this backward again.
        y1, y2, *inputs = (t.detach() for t in ctx.saved_tensors)
        inputs = [t.requires_grad_() for t in inputs]  # fresh leaves, to collect their gradients
        kwargs = {**ctx.consts, **dict(zip(ctx.names, inputs))}
        d_inputs = [None] * len(inputs)
        with torch.enable_grad(), _autocast(ctx.autocast):
            for block, rng in zip(reversed(ctx.blocks), reversed(ctx.rng)):
                own = _trainable_params(block)
                y1, y2, dy1, dy2, own_grads = _backward_one(block, y1, y2, dy1, dy2, kwargs,
                                                            rng, ctx.devices, inputs + own)
                d_inputs = [_add(a, g) for a, g in zip(d_inputs, own_grads)]  # sum over blocks
                for p, g in zip(own, own_grads[len(inputs):]):  # ... and over shared parameters
                    grads[index[id(p)]] = _add(grads[index[id(p)]], g)
        return (None, None, None, dy1, dy2, *d_inputs, *grads)


def _forward_recording(block, x1, x2, kwargs, devices):
    """ReversibleBlock.forward, also returning the RNG states that F and G started from."""
    rng_f = _get_rng(devices)
    y1 = x1 + block.f(x2, **kwargs)                    # y1 = x1 + F(x2)
    rng_g = _get_rng(devices)
    y2 = x2 + block.g(y1)                              # y2 = x2 + G(y1)
    return y1, y2, (rng_f, rng_g)


def _backward_one(block, y1, y2, dy1, dy2, kwargs, rng, devices, params):
    # params: the leaves whose gradients are wanted (keyword inputs, then the block's parameters)
    """Rebuild one block's inputs from its outputs and backprop through it (RevNet Algorithm 1).

        x2 = y2 - G(y1)        dL/dy1 <- dL/dy1 + (dG/dy1)^T dL/dy2
        x1 = y1 - F(x2)        dL/dx2  = dL/dy2 + (dF/dx2)^T dL/dy1,   dL/dx1 = dL/dy1

    F and G are each recomputed once, on the forward pass's random draws; one output serves both
    the inverse and the backprop. Returns x1, x2, dL/dx1, dL/dx2 and the gradients of params.
    """
    rng_f, rng_g = rng
    y1 = y1.requires_grad_()                           # a fresh leaf: y1 was detached
    with _replay_rng(rng_g, devices):
        gy1 = block.g(y1)                              # (B, T, C), G's graph for this block only
    x2 = (y2 - gy1.detach()).requires_grad_()          # x2 = y2 - G(y1)
    d_g = _grad(gy1, [y1] + params, dy2)               # frees G's graph
    dy1 = _add(dy1, d_g[0])
    with _replay_rng(rng_f, devices):
        fx2 = block.f(x2, **kwargs)
    x1 = y1.detach() - fx2.detach()                    # x1 = y1 - F(x2)
    d_f = _grad(fx2, [x2] + params, dy1)
    dx2 = _add(dy2, d_f[0])
    param_grads = [_add(a, b) for a, b in zip(d_g[1:], d_f[1:])]
    return x1, x2.detach(), dy1, dx2, param_grads


def _grad(output, inputs, grad_output):
    # Under autocast the recomputed output may be half precision while the incoming gradient is
    # float32; ordinary autograd casts the gradient to the output's dtype, so we do the same.
    # allow_unused: a parameter may be used by F only or by G only.
    return torch.autograd.grad(output, inputs, grad_output.to(output.dtype), allow_unused=True)


def _add(a, b):
    # None stands for "no gradient" (a parameter the computation did not use)
    return b if a is None else (a if b is None else a + b)


# -----------------------------------------------------------------------------------------------
# RNG and autocast state, recorded in forward and replayed in backward
# -----------------------------------------------------------------------------------------------

def _get_rng(devices):
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng(state, devices):
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for d, s in zip(devices, cuda):
        torch.cuda.set_rng_state(s, d)


@contextlib.contextmanager
def _replay_rng(state, devices):
    """Run the body from a recorded RNG state, then put back the state from before (a fork)."""
    outer = _get_rng(devices)
    _set_rng(state, devices)
    try:
        yield
    finally:
        _set_rng(outer, devices)


def _autocast_state(device_types):
    return {t: (torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in device_types}


@contextlib.contextmanager
def _autocast(state):
    """Re-enter the recorded autocast state (on or off) for every recorded device type."""
    with contextlib.ExitStack() as stack:
        for device_type, (enabled, dtype) in state.items():
            stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
        yield
