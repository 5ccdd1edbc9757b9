"""
Chunked feed-forward layer and chunked output loss: Section 3 ("Chunking") of the Reformer paper
(Kitaev, Kaiser, Levskaya, "Reformer: The Efficient Transformer", ICLR 2020, arXiv 2001.04451).

Checked against the same computation in one piece (n_chunks=1, and F.cross_entropy on the full
logits) in tests/test_chunked_ff.py: equal outputs and gradients for every n_chunks, including
counts that do not divide the length. Imports only torch and the standard library: paste it
anywhere.

The idea. The feed-forward layer treats every position on its own,

    FF(x) = W2 act(W1 x + b1) + b2         x: (C,)   W1: (d_ff, C)   W2: (C, d_ff)

so the sequence can be cut into n_chunks pieces along T and each piece pushed through the whole
layer before the next one starts. The hidden activation, the layer's largest tensor
((B, T, d_ff) with d_ff = 4 C), then exists one piece at a time: (B, T / n_chunks, d_ff).
The output layer is per position too: the logits (B, T, vocab) and their cross-entropy can be
computed piece by piece, and only the summed loss is kept.

Memory under autograd. Chunking the forward pass alone does not help training: autograd would save
every piece's activations for backward, and together they are the whole intermediate again. So
when gradients are on, each piece runs under torch.utils.checkpoint: only the piece's input is
kept, and backward recomputes the piece and backprops through it before moving to the next. The
(B, T, d_ff) hidden activation and the (B, T, vocab) logits then never exist whole, in forward or
in backward, at the cost of one more forward pass of the chunked part (the paper's trade-off,
Table 3: "chunked reversible" memory b l d_model). torch.utils.checkpoint also replays the dropout
masks and the autocast state of each piece, so gradients equal those of the unchunked layer.
n_chunks=1 is the plain layer, with no recomputation.

Shape legend: B batch, T time, C channels (d_model), V vocabulary size, N = B * T rows.

Public names:
    chunked(fn, x, n_chunks, dim=1)                          fn applied piece by piece along dim
    ChunkedFeedForward(d_model, d_ff, n_chunks, dropout, activation, hidden_dropout)
                                                                         (B, T, C) -> (B, T, C)
    chunked_cross_entropy(hidden, weight, targets, n_chunks, bias=None, label_smoothing=0.0)
                                                                          mean loss, a scalar

Bad n_chunks: a count below 1 (or not an integer) is a ValueError. A count above the length falls
back to one position per piece, so a model configured for long training sequences can still
sample one token at a time.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}   # relu: the authors' choice (trax)


def _n_pieces(n_chunks, length):
    """How many pieces to cut a length into: n_chunks, at most one per position, at least one."""
    if isinstance(n_chunks, bool) or not isinstance(n_chunks, int) or n_chunks < 1:
        raise ValueError(f"n_chunks must be an integer >= 1, got {n_chunks!r}")
    return max(1, min(n_chunks, length))


def chunked(fn, x, n_chunks, dim=1):
    """fn applied to n_chunks pieces of x along dim, the results concatenated along dim.

    Equals fn(x) whenever fn treats the positions along dim independently. Pieces differ in length
    by at most one (torch.tensor_split), so any length works; see the module docstring for
    n_chunks < 1 (ValueError) and n_chunks > length (one position per piece).
    """
    n = _n_pieces(n_chunks, x.size(dim))
    if n == 1:
        return fn(x)
    return torch.cat([fn(piece) for piece in x.tensor_split(n, dim=dim)], dim=dim)


def _checkpointed(fn):
    """fn that keeps only its inputs for backward and recomputes itself there, with the same
    dropout masks (preserve_rng_state) and autocast state. Non-reentrant: works inside the
    reversible backward, with DistributedDataParallel, and with closures over parameters."""
    return lambda *args: checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)


class ChunkedFeedForward(nn.Module):
    """Position-wise feed-forward layer, computed in n_chunks pieces along T.

        FF(x) = dropout(W2 dropout(act(W1 x + b1)) + b2)        (B, T, C) -> (B, T, C)

    Dropout after the activation and after the output projection, as in the authors' trax
    feed-forward block. activation: 'gelu' or 'relu'.
    """

    def __init__(self, d_model, d_ff, n_chunks=1, dropout=0.0, activation="gelu",
                 hidden_dropout=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"ChunkedFeedForward: activation={activation!r}, expected one of "
                             f"{sorted(ACTIVATIONS)}")
        _n_pieces(n_chunks, 1)                                 # reject a bad count early
        self.n_chunks, self.activation = n_chunks, activation
        self.w1 = nn.Linear(d_model, d_ff)
        self.w2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)
        # the hidden layer's own rate (fairseq's --relu_dropout); None: the same as the output's
        self.hidden_dropout = nn.Dropout(dropout if hidden_dropout is None else hidden_dropout)

    def ff(self, x):
        """The unchunked layer on one piece: (B, t, C) -> (B, t, C)."""
        h = self.hidden_dropout(ACTIVATIONS[self.activation](self.w1(x)))  # (B, t, d_ff)
        return self.dropout(self.w2(h))

    def forward(self, x):
        # Checkpoint the pieces only when there is a backward to save memory for (see top).
        fn = self.ff
        if self.n_chunks > 1 and torch.is_grad_enabled():
            fn = _checkpointed(self.ff)
        return chunked(fn, x, self.n_chunks, dim=1)            # (B, T, C)

    def extra_repr(self):
        return f"n_chunks={self.n_chunks}, activation={self.activation!r}"


def chunked_cross_entropy(hidden, weight, targets, n_chunks, bias=None, ignore_index=-100,
                          label_smoothing=0.0):
    """Mean cross-entropy of the logits hidden @ weight.T + bias, n_chunks rows at a time.

    hidden: (B, T, C) or (N, C); weight: (V, C); bias: (V,) or None; targets: (B, T) or (N,)
    class indices. Equals F.cross_entropy(hidden @ weight.T + bias, targets, ignore_index=-100,
    label_smoothing=label_smoothing) in value and gradients: the mean over targets that are not
    ignore_index. (Label smoothing eps, used for translation, mixes the one-hot target with the
    uniform distribution: loss_i = (1 - eps) CE(z_i, t_i) + eps mean_v -log softmax(z_i)_v.) If every target is
    ignored the result is NaN (0 / 0), exactly as F.cross_entropy. With gradients on, each piece's
    logits are recomputed in backward (see top), so no more than one piece's (N / n_chunks, V)
    logits exist at a time, in forward or backward.

        loss = sum_i [logsumexp_v(z_i) - z_i[t_i]] / #{i : t_i != ignore_index},   z_i = W h_i + b
    """
    h = hidden.reshape(-1, hidden.size(-1))                    # (N, C)
    t = targets.reshape(-1)                                    # (N,)
    if h.size(0) != t.size(0):
        raise ValueError(f"chunked_cross_entropy: {h.size(0)} rows of hidden "
                         f"{tuple(hidden.shape)} but {t.size(0)} targets {tuple(targets.shape)}")
    n = _n_pieces(n_chunks, h.size(0))
    if n == 1:
        return F.cross_entropy(F.linear(h, weight, bias), t, ignore_index=ignore_index,
                               label_smoothing=label_smoothing)

    def piece_loss(h_piece, t_piece):
        logits = F.linear(h_piece, weight, bias)               # (N / n, V): one piece only
        return F.cross_entropy(logits, t_piece, ignore_index=ignore_index, reduction="sum",
                               label_smoothing=label_smoothing)

    fn = _checkpointed(piece_loss) if torch.is_grad_enabled() else piece_loss
    # Sum the pieces, then divide once by the global count: the mean of per-piece means would
    # weigh pieces with few real targets too much.
    total = sum(fn(h_piece, t_piece) for h_piece, t_piece in zip(h.tensor_split(n),
                                                                 t.tensor_split(n)))
    return total / (t != ignore_index).sum()
