"""
LSH attention, local attention and full attention: Section 3 of the Reformer paper
(Kitaev, Kaiser, Levskaya, "Reformer: The Efficient Transformer", ICLR 2020, arXiv 2001.04451).

Checked against the authors' code (google/trax, trax/layers/research/efficient_attention.py) for
behaviour, and against a loop-by-loop re-implementation and full attention in
tests/test_lsh_attention.py. Imports only torch and the standard library: paste it anywhere.

The idea in one paragraph. Softmax attention is dominated by the few keys closest to the query.
With shared query/key vectors ("shared QK") a query is close to the keys that hash to its bucket
under an angular locality-sensitive hash. So: hash every position, sort positions by bucket, cut
the sorted sequence into chunks of `bucket_size`, and let each chunk attend only to itself and the
chunk before it. Cost per round: O(T * bucket_size) instead of O(T^2). Several independent hash
rounds (`n_hashes`) reduce the chance that two similar vectors land in different buckets; their
results are combined with the softmax normalisers of each round.

Shape legend (one vocabulary for the whole repo):
    B   batch (inside the attention functions: batch x heads)
    T   sequence length            C   d_model           nh  number of heads
    hs  head size                  R   n_hashes (rounds)
    m   bucket_size (chunk length)  nc  n_chunks = T // m  n_buckets = T // m

Public names:
    hash_vectors(x, n_buckets, n_hashes, rotations=None)       -> (B, R, T) int64 buckets
    lsh_attention(qk, v, bucket_size, n_hashes, ...)            -> (B, T, hs_v)
    local_attention(q, k, v, bucket_size, ...)                  -> (B, T, hs_v)
    full_attention(q, k, v, causal, padding_mask, shared_qk)    -> (B, T, hs_v)
    LSHSelfAttention(d_model, n_heads, ...)                     the multi-head layer

Does the future leak into the past under causal LSH attention? The causal mask makes sure a query
never *uses* a later key. But the sort is global: a later token's bucket decides where the chunk
boundaries fall, and so *which earlier keys* share a chunk with an earlier query. Changing a future
token can therefore change an earlier output, through the choice of neighbours, not through the
values it sees. tests/test_model.py measures this: with LSH the logits before position t do move
when token t changes (by a small amount), while with full or local attention they never do. What
holds exactly, and is tested: changing the *values* of future positions, or scaling their qk
vectors by positive numbers (which keeps every bucket, so every chunk boundary), never changes
earlier outputs. For autoregressive sampling this matters little (the model is trained under the
same conditions), but it means causal LSH is not strictly causal as a function of the whole input.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# The authors' mask values (trax): a query's own key gets -1e5, so it is used only when nothing
# else is available; keys that must never be used (future, padding) get -1e9. Both are finite, so
# a row whose keys are all masked gives a uniform softmax instead of NaN.
SELF_LOGIT = -1e5
MASKED_LOGIT = -1e9


# -----------------------------------------------------------------------------------------------
# 1. Angular LSH
# -----------------------------------------------------------------------------------------------

def hash_vectors(x, n_buckets, n_hashes, rotations=None):
    """Angular locality-sensitive hash of each row of x, `n_hashes` independent rounds.

        h(x) = argmax([xR ; -xR])        R: (hs, n_buckets / 2), a random Gaussian matrix

    Projecting onto random directions and taking the closest of the +-directions partitions the
    sphere into n_buckets cones; two vectors at a small angle land in the same cone with high
    probability (Andoni et al. 2015). Only the direction of x matters, so scaling x by a positive
    number never changes its bucket, and x and -x land n_buckets / 2 apart.

    x: (B, T, hs). rotations: (hs, R, n_buckets // 2) shared by every row of B, or
    (B, hs, R, n_buckets // 2), one per row (per head). When None they are drawn fresh from the
    current RNG (torch.randn), so each forward pass uses new hash functions, as the paper does.
    Returns buckets (B, R, T), int64 in [0, n_buckets).
    """
    if x.dim() != 3:
        raise ValueError(f"hash_vectors: x must be (B, T, hs), got shape {tuple(x.shape)}")
    if n_buckets < 2 or n_buckets % 2:
        raise ValueError(f"hash_vectors: n_buckets must be even and >= 2, got {n_buckets}")
    if n_hashes < 1:
        raise ValueError(f"hash_vectors: n_hashes must be >= 1, got {n_hashes}")
    B, T, hs = x.shape
    if rotations is None:
        rotations = torch.randn(B, hs, n_hashes, n_buckets // 2, device=x.device, dtype=x.dtype)
    expected = ((hs, n_hashes, n_buckets // 2), (B, hs, n_hashes, n_buckets // 2))
    if tuple(rotations.shape) not in expected:
        raise ValueError(f"hash_vectors: rotations must have shape {expected[0]} or {expected[1]} "
                         f"for x of shape {tuple(x.shape)}, got {tuple(rotations.shape)}")
    rot = rotations.to(x.dtype).reshape(-1, hs, n_hashes * (n_buckets // 2))
    # The scores xR are (B, T, R * n_buckets/2): with n_buckets = T / bucket_size that is
    # quadratic in T. Hash at most `piece` positions at a time so this transient never exceeds
    # 4M scores per row (at bucket_size 64 that is one piece up to T = 16K; the logits of
    # attention are R * T * 2 * bucket_size).
    piece = max(1, (1 << 22) // (n_hashes * n_buckets // 2))
    with torch.no_grad():  # argmax has no gradient; the hash only decides who attends to whom
        buckets = torch.cat([_argmax_pm(torch.matmul(xp, rot), n_hashes, n_buckets)
                             for xp in x.detach().split(piece, dim=1)], dim=-1)
    return buckets                                             # (B, R, T)


def _argmax_pm(xr, n_hashes, n_buckets):
    """argmax([xR ; -xR]) without building it: the best of +R is argmax(xR), the best of -R is
    argmin(xR); take whichever is larger in magnitude (bucket i or n_buckets/2 + i).
    xr: (B, t, R * n_buckets/2) -> (B, R, t)."""
    B, t = xr.shape[:2]
    xr = xr.view(B, t, n_hashes, n_buckets // 2).transpose(1, 2)    # (B, R, t, n_buckets/2)
    hi, lo = xr.max(dim=-1), xr.min(dim=-1)
    return torch.where(hi.values >= -lo.values, hi.indices, lo.indices + n_buckets // 2)


# -----------------------------------------------------------------------------------------------
# 2. Attention inside chunks: the work shared by LSH and local attention
# -----------------------------------------------------------------------------------------------

def _look_one_back(x):
    """Each chunk followed by the chunk before it: (..., nc, m, *) -> (..., nc, 2m, *).

    The chunk dim is dim 2 of a (B, R, nc, m, *) tensor. The first chunk looks back
    to the last one (for LSH, step 3 of lsh_attention; local attention masks that wrap-around).
    Rolling along the chunk dim of one round keeps rounds apart.
    """
    return torch.cat([x, x.roll(1, dims=2)], dim=3)


def _invalid_keys(q_pos, k_pos, k_valid, causal, wrap):
    """Which window keys a query may never use: (B, R, nc, m, 2m) bool, or None if there are none.

    Future keys under causal masking, padding keys, and for local attention (wrap=False) the
    look-back of the first chunk, which has no chunk before it."""
    invalid = None
    if causal:
        invalid = q_pos.unsqueeze(-1) < k_pos.unsqueeze(-2)    # (B, R, nc, m, 2m)
    if k_valid is not None:
        pad = ~k_valid.unsqueeze(-2)                           # (B, R, nc, 1, 2m)
        invalid = pad.expand(*q_pos.shape, k_pos.shape[-1]).clone() if invalid is None \
            else invalid.logical_or_(pad)
    if not wrap:
        if invalid is None:
            invalid = torch.zeros(*q_pos.shape, k_pos.shape[-1], dtype=torch.bool,
                                  device=q_pos.device)
        invalid[:, :, 0, :, q_pos.shape[-1]:] = True
    return invalid


class _ChunkAttention(torch.autograd.Function):
    """Softmax attention of every chunk to itself and the chunk before it, with the authors' masks.

    Written as one autograd Function (forward and backward by hand, FlashAttention-style
    bookkeeping) because autograd through the plain expression keeps several (B, R, nc, m, 2m)
    tensors alive and runs a dozen element-wise passes over them; here the forward keeps only the
    softmax weights P (and a bool mask), and the backward is four matmuls plus two passes:
        S = q k^T * scale, masked;  P = softmax(S);  o = P v;  lse = logsumexp(S)
        dP = do v^T;  dS = P * (dP - rowsum(do * o) + dlse);  dq = dS k;  dk = dS^T q;  dv = P^T do
    The dlse term is there because the round combination (step 5) depends on lse.
    tests/test_lsh_attention.py checks it with torch.autograd.gradcheck.

    q: (B, R, nc, m, hs), k: (B, R, nc, m, hs), v: (B, R, nc, m, hs_v) in sorted order.
    invalid: (B, R, nc, m, 2m) bool or None. log_counts: None or (B, R, nc, m, 2m) floats
    subtracted from the logits (dedup). Returns o: (B, R, nc, m, hs_v) and lse: (B, R, nc, m).
    """

    @staticmethod
    def forward(ctx, q, k, v, invalid, log_counts, shared_qk, scale, dropout):
        m = q.shape[-2]
        # Windows (B, R, nc, 2m, *) exist one at a time and are not saved: backward rebuilds
        # them, which keeps the saved state at q, k, v, P, o (and the bool masks).
        s = torch.matmul(q, _look_one_back(k).transpose(-1, -2))  # (B, R, nc, m, 2m)
        if scale != 1.0:
            s.mul_(scale)
        if shared_qk:
            # A vector is closest to itself, so under shared QK attending to self would crowd out
            # every other key: its logit becomes -1e5, used only if nothing else is valid. In a
            # round each position appears once, in its own chunk: the diagonal of the first m x m
            # block of the window.
            s[..., :m].diagonal(dim1=-2, dim2=-1).fill_(SELF_LOGIT)
        if invalid is not None:
            s.masked_fill_(invalid, MASKED_LOGIT)
        if log_counts is not None:
            s.sub_(log_counts)
        p = torch.softmax(s, dim=-1)                           # (B, R, nc, m, 2m)
        # lse without a second exp pass: the largest weight is exp(max - lse), so
        # lse = max(S) - log(max(P)), exact up to rounding.
        lse = s.amax(dim=-1) - p.amax(dim=-1).log()            # (B, R, nc, m)
        del s
        keep = None
        if dropout > 0.0:
            keep = torch.empty_like(p).bernoulli_(1.0 - dropout).bool()
            pd = p * keep / (1.0 - dropout)                    # dropped, rescaled weights
        else:
            pd = p
        o = torch.matmul(pd, _look_one_back(v))                # (B, R, nc, m, hs_v)
        ctx.save_for_backward(q, k, v, p, o, invalid, keep)
        ctx.shared_qk, ctx.scale, ctx.dropout = shared_qk, scale, dropout
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        with _autocast_off(do):
            return _ChunkAttention._backward(ctx, do, dlse)

    @staticmethod
    def _backward(ctx, do, dlse):
        q, k, v, p, o, invalid, keep = ctx.saved_tensors
        m = q.shape[-2]
        pd = p if keep is None else p * keep / (1.0 - ctx.dropout)
        dv = _fold_look_back(torch.matmul(pd.transpose(-1, -2), do))  # (B, R, nc, m, hs_v)
        del pd
        dp = torch.matmul(do, _look_one_back(v).transpose(-1, -2))  # (B, R, nc, m, 2m)
        if keep is not None:
            dp.mul_(keep).div_(1.0 - ctx.dropout)
        # softmax backward, with the lse gradient: d lse / d S = P
        row = (do * o).sum(-1, keepdim=True)                   # rowsum(dP * P) = rowsum(do * o)
        if dlse is not None:
            row = row - dlse.unsqueeze(-1)
        ds = dp.sub_(row).mul_(p)                              # (B, R, nc, m, 2m), in place
        # Replaced logits are constants: no gradient flows through them.
        if ctx.shared_qk:
            ds[..., :m].diagonal(dim1=-2, dim2=-1).fill_(0.0)
        if invalid is not None:
            ds.masked_fill_(invalid, 0.0)
        if ctx.scale != 1.0:
            ds.mul_(ctx.scale)
        dq = torch.matmul(ds, _look_one_back(k))               # (B, R, nc, m, hs)
        dk = _fold_look_back(torch.matmul(ds.transpose(-1, -2), q))  # (B, R, nc, m, hs)
        return dq, dk, dv, None, None, None, None, None


def _fold_look_back(dw):
    """Gradient of _look_one_back: (B, R, nc, 2m, *) -> (B, R, nc, m, *). A chunk's keys were
    used by itself (first half of its window) and by the next chunk (second half)."""
    m = dw.shape[3] // 2
    return dw[:, :, :, :m] + dw[:, :, :, m:].roll(-1, dims=2)


def _attend_in_chunks(q, k, v, q_pos, k_valid, causal, shared_qk, scale, dedup_log_counts=None,
                      dropout=0.0, training=False, wrap=True):
    """Attention of every chunk to itself and the chunk before it, all chunks and rounds at once.

    q, k: (B, R, nc, m, hs), v: (B, R, nc, m, hs_v), q_pos: (B, R, nc, m) original positions,
    k_valid: (B, R, nc, m) bool or None. Returns the output (B, R, nc, m, hs_v) and the
    log-sum-exp of each query's logits lse: (B, R, nc, m), needed to combine rounds.
    """
    k_pos = _look_one_back(q_pos)                              # (B, R, nc, 2m)
    k_valid = None if k_valid is None else _look_one_back(k_valid)
    invalid = _invalid_keys(q_pos, k_pos, k_valid, causal, wrap)
    return _ChunkAttention.apply(q, k, v, invalid, dedup_log_counts, shared_qk, scale,
                                 dropout if training else 0.0)


def _dedup_log_counts(undo_sort, q_pos, m, dtype):
    """log(c_ij): in how many rounds key j falls in query i's window (step 6 of lsh_attention).

    undo_sort: (B, R, T) the sorted slot of each position in each round; q_pos: (B, R, nc, m).
    In round r, j is in i's window iff chunk_r(j) is chunk_r(i) or the chunk before it (mod nc).
    Memory: R times the logits, (B, R, nc, m, 2m, R) booleans. Returns (B, R, nc, m, 2m) of dtype.
    """
    B, R, nc, _ = q_pos.shape
    chunk_of = (undo_sort // m).transpose(1, 2)                # (B, T, R): chunk of a position
    k_pos = _look_one_back(q_pos)                              # (B, R, nc, 2m)
    flat = lambda p: p.reshape(B, -1)
    cq = torch.gather(chunk_of, 1, flat(q_pos).unsqueeze(-1).expand(-1, -1, R))
    ck = torch.gather(chunk_of, 1, flat(k_pos).unsqueeze(-1).expand(-1, -1, R))
    cq = cq.view(B, R, nc, m, 1, R)
    ck = ck.view(B, R, nc, 1, 2 * m, R)
    in_window = ((cq - ck) % nc) <= 1                          # (B, R, nc, m, 2m, R)
    counts = in_window.sum(-1).clamp_(min=1)                   # >= 1: the current round counts
    return counts.to(dtype).log()


# -----------------------------------------------------------------------------------------------
# 3. LSH attention (the function: B may be batch x heads)
# -----------------------------------------------------------------------------------------------

def _check_shapes(fn, q, k, v, padding_mask, q_name="q"):
    """ValueError naming the shapes unless q: (B, T, hs), k: None or like q, v: (B, T, hs_v),
    padding_mask: None or (B, T)."""
    if q.dim() != 3 or v.dim() != 3 or q.shape[:2] != v.shape[:2]:
        raise ValueError(f"{fn}: {q_name} must be (B, T, hs) and v (B, T, hs_v) with the same B "
                         f"and T, got {q_name} {tuple(q.shape)} and v {tuple(v.shape)}")
    if k is not None and k.shape != q.shape:
        raise ValueError(f"{fn}: k must have the shape of q {tuple(q.shape)}, got "
                         f"{tuple(k.shape)}")
    if padding_mask is not None and tuple(padding_mask.shape) != tuple(q.shape[:2]):
        raise ValueError(f"{fn}: padding_mask must be (B, T) = {tuple(q.shape[:2])}, got "
                         f"{tuple(padding_mask.shape)}")


def _float32(*xs):
    """Half-precision inputs go to float32: logits, softmax and the round weights are computed
    there (half cannot hold the -1e9 mask value, and exp() of half logits loses the small weights
    that the round combination needs). None passes through."""
    return [x.float() if x is not None and x.dtype in (torch.float16, torch.bfloat16) else x
            for x in xs]


def _autocast_off(x):
    """Autocast would turn our float32 matmuls back into half ones: switch it off inside."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _check_lsh_inputs(qk, v, bucket_size, n_hashes, padding_mask):
    _check_shapes("lsh_attention", qk, None, v, padding_mask, q_name="qk")
    T = qk.shape[1]
    if bucket_size < 1 or T % (2 * bucket_size):
        raise ValueError(f"lsh_attention: T={T} must be a positive multiple of 2 * bucket_size "
                         f"= {2 * bucket_size} (n_buckets = T // bucket_size must be even); pad "
                         f"the sequence, or use LSHSelfAttention, which pads for you")
    if n_hashes < 1:
        raise ValueError(f"lsh_attention: n_hashes must be >= 1, got {n_hashes}")


def _gather_rows(x, idx):
    """x: (B, T, *), idx: (B, R, T) positions -> (B, R, T, *) with out[b, r, t] = x[b, idx[b, r, t]].

    Done as one flat index_select (its backward is one index_add), cheaper than gather with an
    index expanded over the feature dim."""
    B, T = x.shape[:2]
    offsets = torch.arange(B, device=x.device).view(B, 1, 1) * T
    flat = x.reshape(B * T, *x.shape[2:]).index_select(0, (idx + offsets).reshape(-1))
    return flat.view(*idx.shape, *x.shape[2:])


def lsh_attention(qk, v, bucket_size, n_hashes, causal=False, padding_mask=None, rotations=None,
                  dedup=False, dropout=0.0, training=False):
    """Multi-round LSH attention with shared QK. qk: (B, T, hs), v: (B, T, hs_v) -> (B, T, hs_v).

    n_buckets = T // bucket_size, so T must be a multiple of 2 * bucket_size. padding_mask:
    (B, T) bool, True for real tokens. rotations: see hash_vectors. dedup: count a key seen in
    several rounds once (step 6). dropout applies to the attention weights when training.
    """
    _check_lsh_inputs(qk, v, bucket_size, n_hashes, padding_mask)
    out_dtype = v.dtype
    qk, v = _float32(qk, v)
    with _autocast_off(qk):
        out = _lsh_attention(qk, v, bucket_size, n_hashes, causal, padding_mask, rotations,
                             dedup, dropout, training)
    return out.to(out_dtype)


def _lsh_attention(qk, v, bucket_size, n_hashes, causal, padding_mask, rotations, dedup,
                   dropout, training):
    """The steps of lsh_attention, on checked float32/float64 inputs."""
    B, T, hs = qk.shape
    m, R = bucket_size, n_hashes
    nc = n_buckets = T // m

    # 1) Hash: (B, R, T) buckets. Rounds live in their own tensor dim, so buckets of different
    #    rounds can never mix (the authors offset them by r * n_buckets in one long sequence).
    buckets = hash_vectors(qk, n_buckets, R, rotations)

    # 2) Sort each round by (bucket, position). Positions break ties, so inside a bucket the
    #    order is the original one (which keeps causal masking meaningful: earlier first).
    #    sort_key is unique, so any sort is stable on it.
    pos = torch.arange(T, device=qk.device)
    sort_key = buckets * T + pos                               # (B, R, T)
    sorted_pos = sort_key.argsort(dim=-1)                      # (B, R, T): slot -> position
    undo_sort = torch.empty_like(sorted_pos).scatter_(-1, sorted_pos, pos.expand(B, R, T))

    # 3) Chunk each round on its own. A chunk sees itself and the chunk before it *in the same
    #    round*; the first chunk of a round looks back to the last chunk of that round:
    #    P_i = {j : floor(s_i/m) - 1 <= floor(s_j/m) <= floor(s_i/m)} (mod nc).
    #    trax and the Hugging Face port lay all rounds end to end, so there a round's first chunk
    #    sees the previous round's last chunk; keeping rounds apart makes each round an attention
    #    over a well-defined set, which is what lets us combine rounds exactly (step 5) and test
    #    each round against full attention. No mask by bucket inside the window (as the authors).
    # Shared QK: keys are the queries normalised to unit length, k_hat = q / |q|; logit q . k_hat.
    # (trax normalises k and divides by sqrt(hs) after an RMS norm: the same unit vector.)
    # Normalised once per position, before the R sorted copies are made.
    k_hat = F.normalize(qk, p=2.0, dim=-1)                     # (B, T, hs)
    q_s = _gather_rows(qk, sorted_pos).view(B, R, nc, m, hs)   # sorted queries
    k_s = _gather_rows(k_hat, sorted_pos).view(B, R, nc, m, hs)  # sorted unit keys
    v_s = _gather_rows(v, sorted_pos).view(B, R, nc, m, -1)    # (B, R, nc, m, hs_v)
    q_pos = sorted_pos.view(B, R, nc, m)
    k_valid = None
    if padding_mask is not None:
        k_valid = torch.gather(padding_mask.bool().unsqueeze(1).expand(B, R, T), 2,
                               sorted_pos).view(B, R, nc, m)

    # 4) Masked softmax attention in every chunk (self -> -1e5, future/padding -> -1e9).
    # 6) dedup: a key that query i sees in c rounds gets log c subtracted from its logit in each,
    #    so summed over rounds it weighs exactly once, like in full attention.
    log_counts = _dedup_log_counts(undo_sort, q_pos, m, qk.dtype) if dedup and R > 1 else None
    o_s, lse_s = _attend_in_chunks(q_s, k_s, v_s, q_pos, k_valid, causal, shared_qk=True,
                                   scale=1.0, dedup_log_counts=log_counts,
                                   dropout=dropout, training=training)

    # Undo the sort: outputs and their lse travel together through one index_select.
    flat_undo = undo_sort + torch.arange(R, device=qk.device).view(1, R, 1) * T  # (B, R, T)
    o_lse = torch.cat([o_s, lse_s.unsqueeze(-1)], dim=-1).view(B, R * T, -1)
    o_lse = _gather_rows(o_lse, flat_undo)                     # (B, R, T, hs_v + 1)
    o, lse = o_lse[..., :-1], o_lse[..., -1]                   # (B, R, T, hs_v), (B, R, T)

    # 5) Combine rounds by their normalisers, the paper's Eq. (not an average):
    #    o_i = sum_r exp(lse_r(i) - logsumexp_r lse_r(i)) o_r(i)
    #    This is exactly softmax attention over the union of the rounds' windows (with a key that
    #    appears in c rounds counted c times, unless dedup).
    w = torch.softmax(lse, dim=1).unsqueeze(-1)                # (B, R, T, 1)
    out = (w * o).sum(dim=1)                                   # (B, T, hs_v)

    # 7) Memory: the largest tensors are the logits (B, R, nc, m, 2m) = 2 B R T m floats, linear
    #    in T for a fixed bucket_size (the hash scores, R T n_buckets / 2, grow as T^2 / m but are
    #    computed piece by piece in hash_vectors), and linear in n_hashes because all rounds go through one
    #    batched matmul. Looping over rounds would keep one round's logits at a time (memory flat
    #    in n_hashes) but serialises R small matmuls; we chose speed, since the reversible layers
    #    already keep activation memory independent of depth.
    return out


# -----------------------------------------------------------------------------------------------
# 4. Local attention and full attention
# -----------------------------------------------------------------------------------------------

def local_attention(q, k, v, bucket_size, causal=False, padding_mask=None, shared_qk=False,
                    dropout=0.0, training=False):
    """Chunked attention over neighbouring positions: each chunk of `bucket_size` positions
    attends to itself and the chunk before it (the first chunk to itself only). The authors'
    enwik8 model uses it in most layers. T must be a multiple of bucket_size.
    With shared_qk=True, k is ignored and the shared-QK conventions of lsh_attention apply.
    """
    _check_shapes("local_attention", q, None if shared_qk else k, v, padding_mask)
    B, T, hs = q.shape
    if bucket_size < 1 or T % bucket_size:
        raise ValueError(f"local_attention: T={T} must be a positive multiple of bucket_size="
                         f"{bucket_size}")
    m, nc = bucket_size, T // bucket_size
    out_dtype = v.dtype
    q, k, v = _float32(q, k, v)
    if shared_qk:
        with _autocast_off(q):
            k, scale = F.normalize(q, p=2.0, dim=-1), 1.0
    else:
        if k is None:
            raise ValueError("local_attention: k is None, which is valid only with shared_qk=True")
        scale = 1.0 / math.sqrt(hs)
    chunks = lambda x: x.reshape(B, 1, nc, m, *x.shape[2:])   # R = 1 round, identity "sort"
    pos = torch.arange(T, device=q.device).expand(B, T)
    k_valid = None if padding_mask is None else chunks(padding_mask.bool())
    with _autocast_off(q):
        out, _ = _attend_in_chunks(chunks(q), chunks(k), chunks(v), chunks(pos), k_valid, causal,
                                   shared_qk, scale, dropout=dropout, training=training,
                                   wrap=False)
    return out.reshape(B, T, -1).to(out_dtype)


def full_attention(q, k, v, causal=False, padding_mask=None, shared_qk=False, dropout=0.0,
                   training=False):
    """Ordinary O(T^2) softmax attention, the reference. q, k: (B, T, hs), v: (B, T, hs_v).

    shared_qk=False: softmax(q k^T / sqrt(hs)) v, the baseline Transformer.
    shared_qk=True: k may be None; keys are q / |q|, logits q . k_hat, and a query's own logit is
    -1e5, exactly as in lsh_attention, so a model trained with LSH can be evaluated with full
    attention on the same weights (paper Table 2). Invalid keys get -1e9 (finite: no NaN).
    Without masks beyond causal it runs PyTorch's fused F.scaled_dot_product_attention.
    """
    _check_shapes("full_attention", q, None if shared_qk else k, v, padding_mask)
    B, T, hs = q.shape
    p_drop = dropout if training else 0.0
    if not shared_qk:
        if k is None:
            raise ValueError("full_attention: k is None, which is valid only with shared_qk=True")
        if padding_mask is None:   # the common case: PyTorch's fused (flash) kernel, no mask tensor
            # (1, B, T, hs): the fused CPU kernel takes 4-d inputs only; 3-d ones fall back to
            # the O(T^2)-memory math path, about 3x slower.
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=p_drop)[0]
    out_dtype = v.dtype
    q, k, v = _float32(q, k, v)                                # as in lsh_attention
    with _autocast_off(q):
        out = _masked_full_attention(q, k, v, causal, padding_mask, shared_qk, p_drop)
    return out.to(out_dtype)


def _masked_full_attention(q, k, v, causal, padding_mask, shared_qk, p_drop):
    B, T, hs = q.shape
    if shared_qk:
        k, scale = F.normalize(q, p=2.0, dim=-1), 1.0
    else:
        scale = 1.0 / math.sqrt(hs)
    # The same masks as the LSH path, replacing logits (not adding to them), so the two agree
    # exactly, even on rows where every key is invalid (uniform weights, no NaN).
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale       # (B, T, T)
    if shared_qk:
        logits.diagonal(dim1=-2, dim2=-1).fill_(SELF_LOGIT)
    if causal:
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        logits.masked_fill_(future, MASKED_LOGIT)
    if padding_mask is not None:
        logits.masked_fill_(~padding_mask.bool().view(B, 1, T), MASKED_LOGIT)
    p = F.dropout(torch.softmax(logits, dim=-1), p_drop, training=p_drop > 0)
    out = torch.matmul(p, v)                                   # (B, T, hs_v)
    return out


# -----------------------------------------------------------------------------------------------
# 5. The multi-head layer
# -----------------------------------------------------------------------------------------------

ATTN_KINDS = ("lsh", "full", "local")


class LSHSelfAttention(nn.Module):
    """Multi-head self-attention with LSH, local or full attention over the same weights.

    `attn` and `n_hashes` are plain attributes: a model trained with LSH-4 can be evaluated with
    full attention or LSH-8 by setting them (paper Table 2). With shared_qk=True (the Reformer)
    one projection gives queries and keys; shared_qk=False (the baseline Transformer) adds a key
    projection and is valid with attn='full' or 'local' only, since LSH needs shared QK.
    forward pads T up to a multiple of 2 * bucket_size (lsh, local), masks the padding and returns
    T positions, so callers can use any length.
    """

    def __init__(self, d_model, n_heads, bucket_size=64, n_hashes=4, causal=False, attn="lsh",
                 shared_qk=True, dropout=0.0, dedup=False):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"LSHSelfAttention: d_model={d_model} must be divisible by "
                             f"n_heads={n_heads}")
        self.d_model, self.n_heads, self.hs = d_model, n_heads, d_model // n_heads
        self.bucket_size, self.n_hashes, self.causal = bucket_size, n_hashes, causal
        self.attn, self.shared_qk, self.dropout, self.dedup = attn, shared_qk, dropout, dedup
        self._check()
        self.qk = nn.Linear(d_model, d_model, bias=False)     # queries (and keys when shared)
        self.k = None if shared_qk else nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model)

    def _check(self):
        if self.attn not in ATTN_KINDS:
            raise ValueError(f"LSHSelfAttention: attn={self.attn!r}, expected one of {ATTN_KINDS}")
        if self.attn == "lsh" and not self.shared_qk:
            raise ValueError("LSHSelfAttention: shared_qk=False is valid only with attn='full' or "
                             "'local'; LSH attention hashes one vector per position (shared QK)")
        if self.n_hashes < 1:
            raise ValueError(f"LSHSelfAttention: n_hashes must be >= 1, got {self.n_hashes}")
        if self.bucket_size < 1:
            raise ValueError(f"LSHSelfAttention: bucket_size must be >= 1, got {self.bucket_size}")

    def _heads(self, x):
        B, T, _ = x.shape   # (B, T, C) -> (B * nh, T, hs): heads become batch rows
        return x.view(B, T, self.n_heads, self.hs).transpose(1, 2).reshape(B * self.n_heads, T, -1)

    def forward(self, x, padding_mask=None):
        self._check()   # attn / n_hashes may have been changed since construction
        B, T, C = x.shape
        if padding_mask is not None and tuple(padding_mask.shape) != (B, T):
            raise ValueError(f"LSHSelfAttention: padding_mask must be (B, T) = {(B, T)}, got "
                             f"{tuple(padding_mask.shape)}")
        # 1) pad T up to a multiple of 2 * bucket_size (LSH needs an even number of buckets)
        multiple = 2 * self.bucket_size if self.attn == "lsh" else self.bucket_size
        pad = (-T) % multiple if self.attn != "full" else 0
        if pad:
            x = F.pad(x, (0, 0, 0, pad))                       # (B, T + pad, C)
            real = torch.zeros(B, T + pad, dtype=torch.bool, device=x.device)
            real[:, :T] = True if padding_mask is None else padding_mask.bool()
            padding_mask = real
        # 2) project and split heads: (B * nh, T', hs)
        qk, v = self._heads(self.qk(x)), self._heads(self.v(x))
        mask = None
        if padding_mask is not None:
            mask = padding_mask.bool().repeat_interleave(self.n_heads, dim=0)  # (B * nh, T')
        drop = dict(dropout=self.dropout, training=self.training)
        # 3) attend
        if self.attn == "lsh":
            y = lsh_attention(qk, v, self.bucket_size, self.n_hashes, causal=self.causal,
                              padding_mask=mask, dedup=self.dedup, **drop)
        else:
            k = None if self.shared_qk else self._heads(self.k(x))
            fn = full_attention if self.attn == "full" else local_attention
            size = {} if self.attn == "full" else dict(bucket_size=self.bucket_size)
            y = fn(qk, k, v, causal=self.causal, padding_mask=mask, shared_qk=self.shared_qk,
                   **size, **drop)
        # 4) merge heads, drop the padding, project out: (B, T, C)
        y = y.view(B, self.n_heads, -1, self.hs).transpose(1, 2).reshape(B, -1, C)[:, :T]
        return self.out(y)

    def extra_repr(self):
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, attn={self.attn!r}, "
                f"bucket_size={self.bucket_size}, n_hashes={self.n_hashes}, "
                f"causal={self.causal}, shared_qk={self.shared_qk}, dedup={self.dedup}")
