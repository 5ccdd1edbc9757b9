"""
LSH attention, local attention and full attention: Section 2 of the Reformer paper
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

How to read this file (`python plot.py lsh_attention` draws the steps for a small example first):
    Part 1  the algorithm in plain PyTorch, autograd does every backward: hash_vectors,
            look_one_back, lsh_attention (steps 1-9, the paper's order; lsh_attention_heads takes
            heads side by side and half precision), local_attention, full_attention. This is all
            of Section 2; read it top to bottom.
    Part 2  the same functions, fast (lsh_attention_fast, local_attention_fast,
            full_attention_fast): strided views, hand-written backward passes, PyTorch's fused
            attention kernel. Same math, proven equal to Part 1 by the tests.
    Part 3  LSHSelfAttention, the multi-head layer; impl='fast' (default) or 'reference' (Part 1).

Shape legend (one vocabulary for the whole repo; each symbol has one meaning):
    B   batch; inside the attention functions every (batch row, head) pair is one row of B
    T   sequence length     C   d_model     nh  number of heads     hs  head size (of qk)
    hs_v  head size of v    m   bucket_size, the chunk length
    n_hashes   hash rounds  n_buckets   buckets per round (T // m for LSH)
    n_chunks   chunks per round, T // m     R   the random rotation matrix of the hash
  and in Part 2's chunk layout only (defined there):
    L   rows of one round in the layout, T + m      G   chunks in the layout
    n   query windows in the layout, G - 1          N   rows of a layout tensor

The nine steps of LSH attention (Part 1's numbering, used by the tests and the README):
    1 hash   2 sort   3 shared-QK keys   4 chunk, look one back   5 logits and masks
    6 dedup   7 softmax in each round   8 undo the sort   9 combine the rounds

The attention kinds of the layer (Part 3's attn, ATTN_KINDS): lsh, local, and full attention in
five conventions (FULL_KINDS). full is ours, with lsh_attention's shared-QK conventions (keys
q / |q|, own logit -1e5, no 1 / sqrt(hs)); full_scaled, full_self and full_raw_keys each change one
of them (logits / sqrt(hs); a query may attend to itself; keys q); full_dot changes all three: the
authors' dot-product attention, softmax(q q^T / sqrt(hs)) with the diagonal allowed.

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


# ===============================================================================================
# Part 1. The algorithm, readable: plain PyTorch, autograd does the backward
# ===============================================================================================

def hash_vectors(x, n_buckets, n_hashes, rotations=None):
    """Angular locality-sensitive hash of each row of x, `n_hashes` independent rounds.

        h(x) = argmax([xR ; -xR])        R: (hs, n_buckets / 2), a random Gaussian matrix

    Projecting onto random directions and taking the closest of the +-directions partitions the
    sphere into n_buckets cones; two vectors at a small angle land in the same cone with high
    probability (Andoni et al. 2015). Only the direction of x matters, so scaling x by a positive
    number never changes its bucket, and x and -x land n_buckets / 2 apart.

    x: (B, T, hs). rotations: (hs, n_hashes, n_buckets // 2) shared by every row of B, or
    (B, hs, n_hashes, n_buckets // 2), one per row (per head). When None, torch.randn draws them
    afresh with the current RNG, so each forward pass uses new hash functions, as the paper
    does. Returns buckets (B, n_hashes, T), int64 in [0, n_buckets).
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
    _check_rotations("hash_vectors", rotations, B, hs, n_hashes, n_buckets, x.shape)
    R = rotations.to(x.dtype).expand(B, hs, n_hashes, n_buckets // 2)   # one R per row and round
    # The scores xR are (B, n_hashes, T, n_buckets/2), and n_buckets = T / bucket_size grows with
    # T: quadratic memory. Scoring 1024 positions at a time keeps it linear in T. No gradient: the
    # hash only decides who attends to whom. The einsum's letters: b the row of B, t the position
    # (of T), i the coordinate (of hs), r the round (of n_hashes), k the direction (of n_buckets/2).
    buckets = []
    for xp in x.detach().split(1024, dim=1):                   # (B, <=1024, hs)
        xR = torch.einsum("bti,birk->brtk", xp, R)             # (B, n_hashes, <=1024, n_buckets/2)
        buckets.append(torch.cat([xR, -xR], dim=-1).argmax(dim=-1))
    return torch.cat(buckets, dim=-1)                          # (B, n_hashes, T)


def look_one_back(x):
    """Every chunk together with the chunk before it: x (..., n_chunks, m, d) -> (..., n_chunks,
    2m, d), window c = [chunk c - 1 ; chunk c]. Chunk 0 looks back to the last chunk (in LSH
    attention the sorted order wraps around; local attention masks that half). Why look back at
    all: a bucket rarely fills exactly one chunk, so a query's bucket-mates may have been sorted
    into the chunk before (the paper's Figure 2). To look one chunk ahead as well, add
    x.roll(-1, dims=-3) to the list (and widen dedup's window test in step 6)."""
    return torch.cat([x.roll(1, dims=-3), x], dim=-2)


def lsh_attention(qk, v, bucket_size, n_hashes, causal=False, padding_mask=None, rotations=None,
                  dedup=False, dropout=0.0, training=False):
    """Multi-round LSH attention with shared QK, the reference: the nine steps, in the paper's
    order. qk: (B, T, hs), v: (B, T, hs_v) -> (B, T, hs_v), in float32 or float64
    (lsh_attention_heads, below, takes heads side by side and half precision).

    n_buckets = n_chunks = T // bucket_size, so T must be a multiple of 2 * bucket_size.
    padding_mask: (B, T) bool, True for real tokens. rotations: see hash_vectors. dedup: count a
    key found in several rounds once (step 6). dropout: on the attention weights, when training.
    Rounds are kept apart: each is sorted and chunked on its own. Memory is linear in T (the
    largest tensors are the logits, (B, n_hashes, n_chunks, m, 2m)), so it trains;
    lsh_attention_fast (Part 2) computes the same function faster.
    """
    _check_lsh_inputs(qk, v, bucket_size, n_hashes, padding_mask, rotations, heads=False)
    B, T, hs = qk.shape
    m = bucket_size
    n_chunks = T // m                    # and n_buckets = n_chunks: a chunk per bucket on average
    pos = torch.arange(T, device=qk.device)
    p_drop = dropout if training else 0.0

    # 1. Hash every position, n_hashes independent rounds:  h(x) = argmax([xR ; -xR])
    buckets = hash_vectors(qk, n_chunks, n_hashes, rotations)      # (B, n_hashes, T)

    # 2. Sort each round by bucket, and by position inside a bucket (earlier first, which keeps
    #    causal masking meaningful). s_i, the slot of position i, is its rank in that order.
    sorted_pos = (buckets * T + pos).argsort(dim=-1)               # (B, n_hashes, T): slot -> i
    undo_sort = sorted_pos.argsort(dim=-1)                         # (B, n_hashes, T): i -> s_i

    # 3. Shared QK: a position's key is its query, normalised:  k_j = q_j / |q_j|
    #    (the logits are q_i . k_j with no 1 / sqrt(hs), as in the authors' trax code: the query
    #    keeps its length, so the model learns the logits' scale; reformer-pytorch and the fastai
    #    code divide by sqrt(hs) as well)
    k = F.normalize(qk, dim=-1)                                    # (B, T, hs)

    # 4. Cut each round's sorted order into chunks of m; a chunk attends to itself and the one
    #    before:  P_i = {j : floor(s_i / m) - 1 <= floor(s_j / m) <= floor(s_i / m)} mod n_chunks
    rows = torch.arange(B, device=qk.device).view(B, 1, 1)
    chunks = lambda x: x[rows, sorted_pos].view(B, n_hashes, n_chunks, m, -1)  # sort, cut
    q_c = chunks(qk)                                               # (B, n_hashes, n_chunks, m, hs)
    k_w, v_w = look_one_back(chunks(k)), look_one_back(chunks(v))  # (.., n_chunks, 2m, hs[_v])
    pos_q = sorted_pos.view(B, n_hashes, n_chunks, m, 1)           # the position of each query
    pos_k = look_one_back(pos_q).transpose(-1, -2)                 # and of each key: (.., 1, 2m)

    # 5. Logits q_i . k_j, and the authors' masks, which replace the logit: a query's own key
    #    -1e5 (used only when nothing else is there), future (causal) and padding keys -1e9
    logits = q_c @ k_w.transpose(-1, -2)                           # (.., n_chunks, m, 2m)
    logits = logits.masked_fill(pos_q == pos_k, SELF_LOGIT)
    if causal:
        logits = logits.masked_fill(pos_k > pos_q, MASKED_LOGIT)
    if padding_mask is not None:
        real_k = look_one_back(chunks(padding_mask.bool().unsqueeze(-1))).transpose(-1, -2)
        logits = logits.masked_fill(~real_k, MASKED_LOGIT)         # real_k: (.., 1, 2m)

    # 6. Dedup (optional): a key that query i finds in N_ij of the rounds loses log N_ij in each,
    #    so that over all rounds it counts once, as in full attention
    if dedup and n_hashes > 1:
        chunk_of = (undo_sort // m).transpose(1, 2)                # (B, T, n_hashes): i's chunks
        b = rows.view(B, 1, 1, 1, 1)
        c_q = chunk_of[b, pos_q]                                   # (.., m, 1, n_hashes)
        c_k = chunk_of[b, pos_k]                                   # (.., 1, 2m, n_hashes)
        in_window = (c_q - c_k) % n_chunks <= 1                    # own chunk or the one before
        logits = logits - in_window.sum(-1).to(logits.dtype).log() # N_ij >= 1 (this round)

    # 7. Softmax in each round r:  o_i^(r) = sum_j exp(logit_ij - lse_i^(r)) v_j,
    #    lse_i^(r) = log sum_j exp(logit_ij), the round's log normaliser (kept for step 9)
    lse = logits.logsumexp(dim=-1, keepdim=True)                   # (.., n_chunks, m, 1)
    p = F.dropout(torch.exp(logits - lse), p_drop, training=p_drop > 0)
    o = p @ v_w                                                    # (.., n_chunks, m, hs_v)

    # 8. Undo the sort: from slot s_i back to position i, in every round
    unsort = lambda x: x.view(B, n_hashes, T, -1).gather(
        2, undo_sort.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))
    o, lse = unsort(o), unsort(lse)                                # (B, n_hashes, T, hs_v or 1)

    # 9. Combine the rounds by their normalisers (not an average), which makes it softmax
    #    attention over the union of the windows:  o_i = sum_r exp(lse_i^(r) - lse_i) o_i^(r),
    #    lse_i = logsumexp_r lse_i^(r)
    return (torch.softmax(lse, dim=1) * o).sum(dim=1)              # (B, T, hs_v)


def lsh_attention_heads(qk, v, bucket_size, n_hashes, causal=False, padding_mask=None,
                        rotations=None, dedup=False, dropout=0.0, training=False):
    """lsh_attention for what a layer hands it: heads side by side, as a linear layer makes them,
    qk (B, T, nh, hs), v (B, T, nh, hs_v) -> (B, T, nh, hs_v), every head attending on its own
    (rotations: one per row of B * nh); and half precision, computed in float32 with autocast
    off, returned in v's dtype. (B, T, hs) inputs pass through to lsh_attention as they are."""
    _check_lsh_inputs(qk, v, bucket_size, n_hashes, padding_mask, rotations)
    out_dtype = v.dtype
    qk, v = _float32(qk, v)
    kw = dict(causal=causal, rotations=rotations, dedup=dedup, dropout=dropout, training=training)
    with _autocast_off(qk):
        if qk.dim() == 3:
            return lsh_attention(qk, v, bucket_size, n_hashes, padding_mask=padding_mask,
                                 **kw).to(out_dtype)
        B, T, nh = qk.shape[:3]      # move the heads into the batch: (B nh, T, hs)
        heads_in_batch = lambda x: x.transpose(1, 2).reshape(B * nh, T, -1)
        mask = None if padding_mask is None else padding_mask.repeat_interleave(nh, dim=0)
        out = lsh_attention(heads_in_batch(qk), heads_in_batch(v), bucket_size, n_hashes,
                            padding_mask=mask, **kw)
    return out.view(B, nh, T, -1).transpose(1, 2).to(out_dtype)  # (B, T, nh, hs_v)


def local_attention(q, k, v, bucket_size, causal=False, padding_mask=None, shared_qk=False,
                    dropout=0.0, training=False):
    """Chunked attention over neighbouring positions, the reference: each chunk of `bucket_size`
    positions attends to itself and the chunk before it (the first chunk to itself only), with
    the chunking of LSH attention's step 4 but without the sort. The authors' enwik8 model uses
    it in most layers. q, k: (B, T, hs), v: (B, T, hs_v); T a multiple of bucket_size.
    With shared_qk=True, k is ignored and the shared-QK conventions of lsh_attention apply.
    """
    _check_local_inputs(q, k, v, bucket_size, padding_mask, shared_qk)
    B, T, hs = q.shape
    m, n_chunks = bucket_size, T // bucket_size
    out_dtype = v.dtype
    q, k, v = _float32(q, k, v)
    with _autocast_off(q):
        k, scale = (F.normalize(q, dim=-1), 1.0) if shared_qk else (k, 1.0 / math.sqrt(hs))
        chunks = lambda x: x.reshape(B, n_chunks, m, -1)                # (B, n_chunks, m, d)
        pos_q = torch.arange(T, device=q.device).view(1, n_chunks, m, 1)  # each query's position
        pos_k = look_one_back(pos_q).transpose(-1, -2)                  # each key's: (.., 1, 2m)
        logits = chunks(q) @ look_one_back(chunks(k)).transpose(-1, -2) * scale  # (.., m, 2m)
        if shared_qk:
            logits = logits.masked_fill(pos_q == pos_k, SELF_LOGIT)
        invalid = torch.zeros(n_chunks, 1, 2 * m, dtype=torch.bool, device=q.device)
        invalid[0, :, :m] = True        # chunk 0 has no chunk before it (look_one_back wrapped)
        if causal:
            invalid = invalid | (pos_k > pos_q)
        if padding_mask is not None:
            invalid = invalid | ~look_one_back(chunks(padding_mask.bool())).transpose(-1, -2)
        p = torch.softmax(logits.masked_fill(invalid, MASKED_LOGIT), dim=-1)
        p = F.dropout(p, dropout, training=training and dropout > 0)
        out = p @ look_one_back(chunks(v))                              # (B, n_chunks, m, hs_v)
    return out.reshape(B, T, -1).to(out_dtype)


def full_attention(q, k, v, causal=False, padding_mask=None, shared_qk=False, dropout=0.0,
                   training=False, unit_keys=True, mask_self=True, scaled=False):
    """Ordinary O(T^2) softmax attention, the reference. q, k: (B, T, hs), v: (B, T, hs_v).

    shared_qk=False: softmax(q k^T / sqrt(hs)) v, the baseline Transformer.
    shared_qk=True: k may be None; keys come from q with lsh_attention's conventions, so a model
    trained with LSH can be evaluated with full attention on the same weights (paper Table 2):
      unit_keys  keys are q / |q| (step 3); False: keys are q
      mask_self  a query's own logit is -1e5 (step 5); False: a query may attend to itself
      scaled     False: logits q . k (step 3); True: divided by sqrt(hs)
    Each can be changed on its own (Part 3's kinds full_raw_keys, full_self, full_scaled); all
    three changed is the authors' dot-product attention, softmax(q q^T / sqrt(hs)) (full_dot).
    Invalid keys get -1e9 (finite: no NaN). Without masks beyond causal the textbook form runs
    PyTorch's fused F.scaled_dot_product_attention.
    """
    _check_shapes("full_attention", q, None if shared_qk else k, v, padding_mask)
    p_drop = dropout if training else 0.0
    if shared_qk:
        k = q
    elif k is None:
        raise ValueError("full_attention: k is None, which is valid only with shared_qk=True")
    else:
        unit_keys, mask_self, scaled = False, False, True     # the baseline Transformer
    if padding_mask is None and scaled and not (unit_keys or mask_self):
        # The textbook softmax(q k^T / sqrt(hs)) v: PyTorch's fused (flash) kernel, no mask
        # tensor. (1, B, T, hs): the fused CPU kernel takes 4-d inputs only; 3-d ones fall back
        # to the O(T^2)-memory math path, about 3x slower.
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=p_drop)[0]
    out_dtype = v.dtype
    q, k, v = _float32(q, k, v)                                # as in lsh_attention_heads
    with _autocast_off(q):
        if unit_keys:
            k = F.normalize(k, dim=-1)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scaled else 1.0
        out = _masked_full_attention(q, k, v, scale, mask_self, causal, padding_mask, p_drop)
    return out.to(out_dtype)


def _masked_full_attention(q, k, v, scale, mask_self, causal, padding_mask, p_drop):
    """The explicit version: the (B, T, T) logits, the masks of lsh_attention's step 5, softmax."""
    B, T, hs = q.shape
    # The same masks as the LSH path, replacing logits (not adding to them), so the two agree
    # exactly, even on rows where every key is invalid (uniform weights, no NaN).
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale       # (B, T, T)
    if mask_self:
        logits.diagonal(dim1=-2, dim2=-1).fill_(SELF_LOGIT)
    if causal:
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        logits.masked_fill_(future, MASKED_LOGIT)
    if padding_mask is not None:
        logits.masked_fill_(~padding_mask.bool().view(B, 1, T), MASKED_LOGIT)
    p = F.dropout(torch.softmax(logits, dim=-1), p_drop, training=p_drop > 0)
    return torch.matmul(p, v)                                  # (B, T, hs_v)


# Input checks and dtype handling, shared by Part 1 and Part 2.

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


def _check_rotations(fn, rotations, rows, hs, n_hashes, n_buckets, shape):
    expected = ((hs, n_hashes, n_buckets // 2), (rows, hs, n_hashes, n_buckets // 2))
    if tuple(rotations.shape) not in expected:
        raise ValueError(f"{fn}: rotations must have shape {expected[0]} or {expected[1]} "
                         f"for x of shape {tuple(shape)}, got {tuple(rotations.shape)}")


def _check_lsh_inputs(qk, v, bucket_size, n_hashes, padding_mask, rotations, heads=True):
    if not heads and (qk.dim() == 4 or v.dim() == 4):
        raise ValueError(f"lsh_attention: qk must be (B, T, hs), got {tuple(qk.shape)}; heads "
                         f"side by side, (B, T, nh, hs), go through lsh_attention_heads")
    if qk.dim() == 4 or v.dim() == 4:   # (B, T, nh, hs): heads side by side
        if qk.dim() != 4 or v.dim() != 4 or qk.shape[:3] != v.shape[:3]:
            raise ValueError(f"lsh_attention: with heads, qk must be (B, T, nh, hs) and v "
                             f"(B, T, nh, hs_v) with the same B, T and nh, got qk "
                             f"{tuple(qk.shape)} and v {tuple(v.shape)}")
        _check_shapes("lsh_attention", qk[:, :, 0], None, v[:, :, 0], padding_mask, "qk")
    else:
        _check_shapes("lsh_attention", qk, None, v, padding_mask, q_name="qk")
    T = qk.shape[1]
    if bucket_size < 1 or T % (2 * bucket_size):
        raise ValueError(f"lsh_attention: T={T} must be a positive multiple of 2 * bucket_size "
                         f"= {2 * bucket_size} (n_buckets = T // bucket_size must be even); pad "
                         f"the sequence, or use LSHSelfAttention, which pads for you")
    if n_hashes < 1:
        raise ValueError(f"lsh_attention: n_hashes must be >= 1, got {n_hashes}")
    if rotations is not None:
        rows = qk.shape[0] * (qk.shape[2] if qk.dim() == 4 else 1)
        _check_rotations("lsh_attention", rotations, rows, qk.shape[-1], n_hashes,
                         T // bucket_size, qk.shape)


def _check_local_inputs(q, k, v, bucket_size, padding_mask, shared_qk):
    _check_shapes("local_attention", q, None if shared_qk else k, v, padding_mask)
    T = q.shape[1]
    if bucket_size < 1 or T % bucket_size:
        raise ValueError(f"local_attention: T={T} must be a positive multiple of bucket_size="
                         f"{bucket_size}")
    if not shared_qk and k is None:
        raise ValueError("local_attention: k is None, which is valid only with shared_qk=True")


def _float32(*xs):
    """Half-precision inputs go to float32: logits, softmax and the round weights are computed
    there (half cannot hold the -1e9 mask value, and exp() of half logits loses the small weights
    that the round combination needs). None passes through."""
    return [x.float() if x is not None and x.dtype in (torch.float16, torch.bfloat16) else x
            for x in xs]


def _autocast_off(x):
    """Autocast would turn our float32 matmuls back into half ones: switch it off inside."""
    return torch.autocast(device_type=x.device.type, enabled=False)


# ===============================================================================================
# Part 2. The same functions, fast
# ===============================================================================================
#
# Part 1 is the whole algorithm. This part computes the same function (tests/test_lsh_attention.py
# checks values and gradients to 1e-10 in float64), faster (python bench.py speed, the rows ours
# and ours-reference). On a CPU the time of attention over (m, 2m) blocks goes less into the
# matmuls than into the passes over the logits and the copies of q, k and v, so each piece below
# removes a pass or a copy. What it does differently, and which step of Part 1 each piece replaces:
#   - the chunk layout (below): each round's last chunk copied in front, so the look-back windows
#     are overlapping strided views read in place by bmm instead of look_one_back's copies
#                                                                    replaces Part 1's step 4
#   - the chunk attention as one autograd Function (_ChunkAttention) with a hand-written
#     backward: softmax in place, lse from the softmax's max (no exp pass of its own), window
#     gradients as two half-size matmuls accumulated in place        replaces steps 5 and 7
#   - the causal mask without padding added by the first matmul (baddbmm_, -1e9 x distance)
#     instead of a boolean masked_fill (exact: every query keeps its own key, so masked weights
#     underflow to 0 either way)                                     replaces step 5's mask
#   - the sort, the unsort and the round combination as Functions whose backward is a gather
#     through the inverse permutation, not a scatter-add of every row
#                                                 replaces the gathers of steps 4 and 8, and step 9
#   - normalised keys with a 3-pass backward instead of autograd's 8 (_Normalize)      step 3
#   - hashing piece by piece, argmax([xR ; -xR]) without building it             replaces step 1
#   - dedup's counts N_ij added up one round at a time, in bytes, by table look-ups      step 6
#   - heads side by side (B, T, nh, hs) all the way: no transposes to move heads into the batch
#   - full attention with separate keys (the baseline Transformer's) as one fused
#     scaled_dot_product_attention, padding as an additive bias    replaces full_attention's
#                                                                  explicit masked path


def _hash(x, n_buckets, n_hashes, rotations):
    """hash_vectors (step 1) for x: (B, T, nh, hs), the nh heads hashed apart -> (B * nh,
    n_hashes, T) buckets; rotations: None, (hs, n_hashes, n_buckets // 2) or (B * nh, hs,
    n_hashes, n_buckets // 2), checked by the caller. The same buckets as hash_vectors, and the
    same draw from the RNG when rotations is None."""
    B, T, nh, hs = x.shape
    half = n_buckets // 2
    if rotations is None:
        rotations = torch.randn(B * nh, hs, n_hashes, half, device=x.device, dtype=x.dtype)
    rot = rotations.to(x.dtype).reshape(-1, hs, n_hashes * half)
    rot = rot.view(B, nh, hs, -1) if rot.shape[0] > 1 else rot.view(1, 1, hs, -1)
    # The scores xR are (B, nh, T, n_hashes * n_buckets/2): with n_buckets = T / m that is
    # quadratic in T (at T = 16K and 8 hashes, more than the logits of attention). Hash a piece
    # of positions at a time, at most 1M scores (4 MB): the transient stays small, and on a CPU
    # a buffer that size is reused by the allocator instead of being mapped fresh (page faults
    # cost as much as the reduction here).
    # On a GPU that size would mean thousands of tiny launches per layer at long T (16 positions
    # a piece at 1M tokens): there, pieces of 64M scores (256 MB).
    budget = 1 << 20 if x.device.type == "cpu" else 1 << 26
    piece = max(1, budget // (B * nh * n_hashes * half))
    with torch.no_grad():  # argmax has no gradient; the hash only decides who attends to whom
        buckets = torch.cat([_argmax_pm(torch.matmul(xp.transpose(1, 2), rot), n_hashes,
                                        n_buckets)
                             for xp in x.detach().split(piece, dim=1)], dim=2)
    # buckets: (B, nh, T, n_hashes)
    return buckets.transpose(-1, -2).contiguous().view(B * nh, n_hashes, T)


def _argmax_pm(xr, n_hashes, n_buckets):
    """argmax([xR ; -xR]) without building it: the best of +R is argmax(xR), the best of -R is
    argmin(xR); take whichever is larger in magnitude (bucket i or n_buckets/2 + i).
    xr: (..., n_hashes * n_buckets/2) -> (..., n_hashes). Reduces along contiguous memory."""
    xr = xr.view(*xr.shape[:-1], n_hashes, n_buckets // 2)     # (..., n_hashes, n_buckets/2)
    hi, lo = xr.max(dim=-1), xr.min(dim=-1)
    return torch.where(hi.values >= -lo.values, hi.indices, lo.indices + n_buckets // 2)


# The chunk layout (replaces look_one_back, step 4). A round (for local attention: a sequence) is
# n_chunks chunks of m rows, and every chunk attends to itself and the chunk before it; the first
# chunk looks back to the round's last chunk. Rather than copying each chunk's window [chunk
# before; chunk] into a (n_chunks, 2m) tensor (twice the keys, twice the values, again in the
# backward pass), rounds are laid end to end with one extra chunk in front of each, a copy of the
# round's last chunk (local attention: a dummy chunk, masked). With c_j chunk j of a round and c'_j
# chunk j of the next round:
#
#     [c_last] c_0 c_1 ... c_last [c'_last] c'_0 c'_1 ... c'_last ...        G chunks, G * m rows
#
# L = T + m rows per round, G = (rounds) x (n_chunks + 1) chunks, N = G * m rows in all. Chunk
# i + 1's window is then chunks i and i + 1 of this flat tensor: an overlapping strided view
# (_windows), no copy, and the queries are the same rows without the first chunk: n = G - 1 query
# windows. One batched matmul covers every chunk of every round. The windows of the extra chunks
# (the last chunk of a round looking back into the next round's front chunk) are computed and
# thrown away: a waste of 1 / n_chunks of the attention work (6 % at n_chunks = 16, 0.4 % at
# n_chunks = 256) that costs no copies.

def _windows(x, m):
    """Overlapping windows of two chunks, as a view: (G * m, d) contiguous -> (G - 1, 2m, d),
    window i = rows [i m, (i + 2) m) = chunks i and i + 1. Batched matmuls read it in place."""
    d = x.shape[-1]
    return x.as_strided((x.shape[0] // m - 1, 2 * m, d), (m * d, d, 1), x.storage_offset())


def _query_and_window(x, m):
    """A per-row value x: (G * m,) seen from both sides of the logits: for every query
    (n, m, 1) and for every key of its window (n, 1, 2m), n = G - 1. Broadcast, they compare
    positions (causal mask) without building anything of the logits' size until the compare."""
    x = x.view(-1, 1)
    n = x.shape[0] // m - 1
    return x[m:].view(n, m, 1), _windows(x, m).view(n, 1, 2 * m)


def _windows_grad(a, b, m):
    """Gradient of _windows(x, m) when the windows' gradient is a^T b: a (n, m, 2m), b (n, m, d)
    -> (G * m, d). Chunk j was the first half of window j and the second half of window j - 1,
    so it gets a[j, :, :m]^T b[j] + a[j - 1, :, m:]^T b[j - 1]: two half-size matmuls, the second
    accumulated in place, with no (n, 2m, d) intermediate to allocate and fold."""
    n, d = a.shape[0], b.shape[-1]
    dx = b.new_empty(n + 1, m, d)
    torch.bmm(a[:, :, m:].transpose(1, 2), b, out=dx[1:])     # second halves: chunks 1..n
    dx[0] = 0.0
    dx[:-1].baddbmm_(a[:, :, :m].transpose(1, 2), b)           # first halves: chunks 0..n-1
    return dx.view(-1, d)


class _ChunkAttention(torch.autograd.Function):
    """Softmax attention of every chunk to its window [chunk before; chunk], with the authors'
    masks: Part 1's steps 5 (logits, masks) and 7 (softmax, o = p v, lse), forward and backward.

    Written as one autograd Function (forward and backward by hand, FlashAttention-style
    bookkeeping) because autograd through the plain expression keeps several (n, m, 2m) tensors
    alive and runs a dozen element-wise passes over them. Those passes, not the matmuls, decide
    the speed on a CPU (each pass over the logits is memory-bound), so the forward keeps only the
    softmax weights P, computes softmax in place, and the backward is four matmuls plus two passes:
        S = q k^T * scale, masked;  P = softmax(S);  o = P v;  lse = logsumexp(S)
        dP = do v^T;  dS = P * (dP - rowsum(do * o) + dlse);  dq = dS k;  dk = dS^T q;  dv = P^T do
    The dlse term is there because the round combination (step 9) depends on lse.
    tests/test_lsh_attention.py checks it with torch.autograd.gradcheck.

    q, k: (G * m, hs), v: (G * m, hs_v), contiguous, in the layout above. Masks, one of:
      future: (G * m,) positions times 1e9, for causal masking without padding. Future keys get
        -1e9 * (distance) added (one fused pass: the mask rides in the first matmul, baddbmm).
        Every query keeps a real key (its own position, at least), so this is the authors'
        replacement by -1e9: exp underflows to exactly 0 either way, in float32 and float64, P,
        lse and the gradients are the same, and the backward needs no mask (dS = P * (...) is
        exactly 0 there).
      invalid: (n, m, 2m) bool, keys replaced by -1e9 (padding, local attention's first chunk,
        causal with padding). A row with no valid key (a padding query) then gets uniform weights,
        as in the authors' code; its gradient must be cut by hand in the backward.
    log_counts: None or (n, m, 2m) subtracted from the logits (dedup).
    Returns o: (n, m, hs_v) and lse: (n, m), n = G - 1 (query chunk i is layout chunk i + 1).
    """

    @staticmethod
    def forward(ctx, q, k, v, m, future, invalid, log_counts, shared_qk, scale, dropout):
        n = q.shape[0] // m - 1
        q_c, k_w = q[m:].view(n, m, -1), _windows(k, m)
        if future is not None:   # bias = -1e9 * max(key position - query position, 0)
            q_pos, k_pos = _query_and_window(future, m)
            s = (q_pos - k_pos).clamp_(max=0.0)
            s.baddbmm_(q_c, k_w.transpose(1, 2), alpha=scale)   # (n, m, 2m) logits
        else:
            s = torch.bmm(q_c, k_w.transpose(1, 2))
            if scale != 1.0:
                s.mul_(scale)
        if shared_qk:
            # A vector is closest to itself, so under shared QK attending to self would crowd out
            # every other key: its logit becomes -1e5, used only if nothing else is valid. In a
            # round each position appears once, in its own chunk: the diagonal of the second half.
            s[:, :, m:].diagonal(dim1=-2, dim2=-1).fill_(SELF_LOGIT)
        if invalid is not None:
            s.masked_fill_(invalid, MASKED_LOGIT)
        if log_counts is not None:
            s.sub_(log_counts)
        # lse without an exp pass of its own: the largest weight is exp(max - lse), so
        # lse = max(S) - log(max(P)), exact up to rounding. On a CPU softmax overwrites S: touching
        # fresh memory for a tensor this size costs as much as the pass itself. (GPUs have a
        # caching allocator, and we have not checked their softmax kernels with aliased output.)
        s_max = s.amax(dim=-1)
        p = torch.softmax(s, dim=-1, out=s) if s.is_cpu else torch.softmax(s, dim=-1)
        lse = s_max - p.amax(dim=-1).log()                     # (n, m)
        keep = None
        if dropout > 0.0:
            keep = torch.empty_like(p).bernoulli_(1.0 - dropout).bool()
            pd = p * keep / (1.0 - dropout)                    # dropped, rescaled weights
        else:
            pd = p
        o = torch.bmm(pd, _windows(v, m))                      # (n, m, hs_v)
        ctx.save_for_backward(q, k, v, p, o, invalid, keep)
        ctx.m, ctx.shared_qk, ctx.scale, ctx.dropout = m, shared_qk, scale, dropout
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        with _autocast_off(do):
            return _ChunkAttention._backward(ctx, do, dlse)

    @staticmethod
    def _backward(ctx, do, dlse):
        q, k, v, p, o, invalid, keep = ctx.saved_tensors
        m = ctx.m
        n = p.shape[0]
        q_c, k_w, v_w = q[m:].view(n, m, -1), _windows(k, m), _windows(v, m)
        pd = p if keep is None else p * keep / (1.0 - ctx.dropout)
        dv = _windows_grad(pd, do, m)                          # (G * m, hs_v)
        del pd
        dp = torch.bmm(do, v_w.transpose(1, 2))                # (n, m, 2m)
        if keep is not None:
            dp.mul_(keep).div_(1.0 - ctx.dropout)
        # softmax backward, with the lse gradient: d lse / d S = P
        row = (do * o).sum(-1, keepdim=True)                   # rowsum(dP * P) = rowsum(do * o)
        if dlse is not None:
            row = row - dlse.unsqueeze(-1)
        ds = dp.sub_(row).mul_(p)                              # (n, m, 2m), in place
        # Replaced logits are constants: no gradient flows through them.
        if ctx.shared_qk:
            ds[:, :, m:].diagonal(dim1=-2, dim2=-1).fill_(0.0)
        if invalid is not None:
            ds.masked_fill_(invalid, 0.0)
        if ctx.scale != 1.0:
            ds.mul_(ctx.scale)
        dq = torch.empty_like(q)
        dq[:m] = 0.0                                           # the front chunk asks no query
        torch.bmm(ds, k_w, out=dq[m:].view(n, m, -1))
        dk = _windows_grad(ds, q_c, m)                         # (G * m, hs)
        return dq, dk, dv, None, None, None, None, None, None, None


def _attend_in_chunks(q, k, v, pos, m, k_valid, causal, shared_qk, scale, log_counts=None,
                      dropout=0.0, training=False):
    """Attention of every chunk to itself and the chunk before it, all chunks and rounds at once
    (steps 5 and 7; Part 1's position comparisons pos_q == pos_k, pos_k > pos_q become the masks).

    q, k: (G * m, hs), v: (G * m, hs_v) in the layout above, pos: (G * m,) original positions,
    k_valid: (G * m,) bool or None. Returns the output (n, m, hs_v) and the log-sum-exp of each
    query's logits (n, m), n = G - 1, needed to combine rounds.
    """
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()   # _windows reads raw strides
    n = q.shape[0] // m - 1
    future = invalid = None
    if k_valid is None:
        if causal:
            future = pos.to(q.dtype) * -MASKED_LOGIT           # (G * m,)
    else:
        invalid = ~_query_and_window(k_valid, m)[1]             # padding keys: (n, 1, 2m)
        if causal:
            q_pos, k_pos = _query_and_window(pos, m)
            invalid = invalid | (q_pos < k_pos)
        else:
            invalid = invalid.expand(n, m, 2 * m).contiguous()
    return _ChunkAttention.apply(q, k, v, m, future, invalid, log_counts, shared_qk, scale,
                                 dropout if training else 0.0)


def _dedup_log_counts(undo_sort, ext, m, dtype):
    """log N_ij: in how many rounds key j falls in query i's window (step 6), as in Part 1, in the
    chunk layout.

    undo_sort: (B, n_hashes, T) the sorted slot of each position in each round; ext: (B, n_hashes,
    L) the positions in the layout above. In round r, j is in i's window iff chunk_r(j) is
    chunk_r(i) or the chunk before it (mod n_chunks). Part 1 compares all rounds at once, in a
    tensor n_hashes times the logits' size; here the counts are bytes of the logits' size, added
    up one round at a time, and each round costs one pass that broadcasts (d = chunk_r(j) -
    chunk_r(i) + n_chunks, from (.., m, 1) and (.., 1, 2m)) and one table look-up: j is in the
    window iff d is n_chunks (the same chunk), n_chunks - 1 (the one before) or 2 n_chunks - 1
    (the one before, across the wrap from chunk 0). log N comes from a table too: the counts are
    1..n_hashes, and an element-wise log costs more than all the rounds.
    Returns (n, m, 2m) of dtype in the layout of _ChunkAttention (zeros for thrown-away windows).
    """
    B, n_hashes, T = undo_sort.shape
    n_chunks, dev = T // m, undo_sort.device
    q_pos, k_pos = ext[..., m:].reshape(B, -1), ext.unfold(-1, 2 * m, m).reshape(B, -1)
    in_window = torch.zeros(2 * n_chunks, dtype=torch.uint8, device=dev)   # the table, by d
    in_window[[n_chunks - 1, n_chunks, 2 * n_chunks - 1]] = 1
    counts = torch.ones(B * n_hashes, n_chunks + 1, m, 2 * m, dtype=torch.uint8, device=dev)
    window = counts[:, 1:].view(B, n_hashes, n_chunks, m, 2 * m).zero_()  # thrown-away: N = 1
    d = torch.empty(window.shape, dtype=torch.int32, device=dev)
    hit = torch.empty(window.shape, dtype=torch.uint8, device=dev)
    for r in range(n_hashes):                                  # N_ij = sum over rounds r of
        chunk_of = (undo_sort[:, r] // m).to(torch.int32)      # (B, T): i's chunk in round r
        c_q = chunk_of.gather(1, q_pos).view(B, n_hashes, n_chunks, m, 1)
        c_k = chunk_of.gather(1, k_pos).view(B, n_hashes, n_chunks, 1, 2 * m)
        torch.sub(c_k + n_chunks, c_q, out=d)                  # (.., n_chunks, m, 2m)
        torch.index_select(in_window, 0, d.view(-1), out=hit.view(-1))  # (index_select: the
        window += hit                                          # fast look-up) [j in i's window]
    log_n = torch.arange(n_hashes + 1, dtype=dtype, device=dev).log()     # log 0 unused
    n_ij = counts.view(-1)[m * 2 * m:].int()                   # windows 1.. of the layout
    return log_n.index_select(0, n_ij).view(-1, m, 2 * m)


def _gather_rows(x, idx):
    """x: (B, T, *), idx: (B, n_hashes, L) positions -> (B, n_hashes, L, *),
    out[b, r, l] = x[b, idx[b, r, l]].

    Done as one flat index_select (its backward is one index_add), cheaper than gather with an
    index expanded over the feature dim."""
    B, T = x.shape[:2]
    offsets = torch.arange(B, device=x.device).view(B, 1, 1) * T
    flat = x.reshape(B * T, *x.shape[2:]).index_select(0, (idx + offsets).reshape(-1))
    return flat.view(*idx.shape, *x.shape[2:])


class _Normalize(torch.autograd.Function):
    """Shared-QK keys k_hat = x / |x| (|x| clamped at 1e-12), replacing Part 1's F.normalize
    (step 3): the same values, with a backward of three passes instead of autograd's eight:
        dx = (dy - k_hat (k_hat . dy)) / |x|     (dx = dy / 1e-12 where |x| was clamped)."""

    @staticmethod
    def forward(ctx, x):
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(1e-12)
        y = x / norm
        ctx.save_for_backward(y, norm)
        return y

    @staticmethod
    def backward(ctx, dy):
        y, norm = ctx.saved_tensors
        along = (y * dy).sum(-1, keepdim=True).masked_fill_(norm <= 1e-12, 0.0)
        return torch.addcmul(dy, y, along, value=-1.0).div_(norm)


def _normalize(x):
    """x / |x| along the last dim (step 3): the shared-QK keys of Part 2."""
    return _Normalize.apply(x)


class _SortRows(torch.autograd.Function):
    """The rows of x: (B T nh, d) in the chunk layout (the gathers of Part 1's step 4):
    y = x[rows], rows: (rounds, L), the row of x behind each layout row (a round sorted, with
    its last chunk repeated in front).

    The backward knows that a round is a permutation plus m repeated rows: the gradient of row i
    of x is a *gather* of its main copy in each round (grad_rows: (rows of x, n_hashes) layout
    rows), summed over rounds, plus the m repeated rows of each round added back.
    index_select's own backward scatter-adds every row, which costs more than the gather."""

    @staticmethod
    def forward(ctx, x, rows, grad_rows, m):
        ctx.save_for_backward(rows, grad_rows)
        ctx.m = m
        return x.index_select(0, rows.view(-1))

    @staticmethod
    def backward(ctx, dy):
        rows, grad_rows = ctx.saved_tensors
        n_rows, n_hashes = grad_rows.shape
        dy = dy.contiguous()
        dx = dy.index_select(0, grad_rows.view(-1)).view(n_rows, n_hashes, -1)
        dx = dx[:, 0] if n_hashes == 1 else dx.sum(dim=1)      # (rows of x, d), a fresh tensor
        front = dy.view(*rows.shape, -1)[:, :ctx.m]            # the repeated chunks
        dx.index_add_(0, rows[:, :ctx.m].reshape(-1), front.reshape(-1, dy.shape[-1]))
        return dx, None, None, None


class _UnsortCombine(torch.autograd.Function):
    """Undo the sort and combine the rounds (steps 8 and 9):
        out[b, t] = sum_r w_r(b, t) o_s[rows[b, r, t]],   w = softmax_r(lse_s[rows])
    o_s: (N, hs_v) and lse_s: (N,) in the chunk layout (rounds of L rows, the last m of each
    thrown away), rows: (B, n_hashes, T) the layout row of position t in round r.
    Returns (B, T, hs_v).

    By hand because autograd through index_select, softmax, multiply and sum allocates several
    (B, n_hashes, T, hs_v) tensors forward and backward; here the rounds are gathered one at a
    time and the backward writes each gradient row once (the rows of a round are a permutation):
        d o_r = w_r dout,   d lse_r = w_r (o_r - out) . dout."""

    @staticmethod
    def forward(ctx, o_s, lse_s, rows, L, m):
        B, n_hashes, T = rows.shape
        w = torch.softmax(lse_s.index_select(0, rows.reshape(-1)).view(B, n_hashes, T), dim=1)
        out = o_s.index_select(0, rows[:, 0].reshape(-1)).view(B, T, -1)
        if n_hashes > 1:
            out.mul_(w[:, 0, :, None])
            for r in range(1, n_hashes):
                o_r = o_s.index_select(0, rows[:, r].reshape(-1)).view(B, T, -1)
                out.addcmul_(o_r, w[:, r, :, None])
        ctx.save_for_backward(o_s, rows, w, out if n_hashes > 1 else None)  # 1 round: o_s rows
        ctx.L, ctx.m = L, m
        return out

    @staticmethod
    def backward(ctx, dout):
        o_s, rows, w, out = ctx.saved_tensors
        B, n_hashes, T = rows.shape
        dout, d = dout.contiguous(), dout.shape[-1]
        # Every row of o_s gets written once, except the thrown-away queries of the chunk
        # layout (the last m rows of every round of L rows; the final round lacks them): zero
        # those only, not the whole tensor.
        L, m, N = ctx.L, ctx.m, o_s.shape[0]
        d_full = o_s.new_empty(N + m, d)
        d_full.view(-1, L, d)[:, L - m:] = 0.0
        d_o = d_full[:N]
        d_lse = torch.zeros_like(o_s[:, 0]) if n_hashes > 1 else None
        out_dout = (out * dout).sum(-1) if n_hashes > 1 else None     # (B, T)
        for r in range(n_hashes):
            idx = rows[:, r].reshape(-1)
            d_o_r = dout if n_hashes == 1 else dout * w[:, r, :, None]
            d_o.index_copy_(0, idx, d_o_r.view(-1, d))
            if n_hashes > 1:
                o_dout = (o_s.index_select(0, idx).view_as(dout) * dout).sum(-1)
                d_lse.index_copy_(0, idx, (w[:, r] * (o_dout - out_dout)).view(-1))
        return d_o, d_lse, None, None, None


def lsh_attention_fast(qk, v, bucket_size, n_hashes, causal=False, padding_mask=None,
                       rotations=None, dedup=False, dropout=0.0, training=False):
    """lsh_attention_heads (Part 1), fast: the same arguments, shapes and values (and the same
    draw of rotations from the RNG; only dropout's random mask is drawn differently). Heads side
    by side, qk (B, T, nh, hs), are attended without moving them into the batch (no transposes)."""
    _check_lsh_inputs(qk, v, bucket_size, n_hashes, padding_mask, rotations)
    out_dtype = v.dtype
    heads = qk.dim() == 4
    qk, v = _float32(qk, v)
    if not heads:
        qk, v = qk.unsqueeze(2), v.unsqueeze(2)                # one head
    with _autocast_off(qk):
        out = _lsh_attention_fast(qk, v, bucket_size, n_hashes, causal, padding_mask, rotations,
                                  dedup, dropout, training)
    return (out if heads else out.squeeze(2)).to(out_dtype)


def _lsh_attention_fast(qk, v, bucket_size, n_hashes, causal, padding_mask, rotations, dedup,
                        dropout, training):
    """The nine steps, on checked float32/float64 inputs qk: (B, T, nh, hs), v: (B, T, nh, hs_v).
    Every (batch row, head) is its own problem: Bnh = B * nh of them, each of n_hashes rounds of
    L = T + m layout rows."""
    B, T, nh, hs = qk.shape
    m = bucket_size
    n_buckets, Bnh, L = T // m, B * nh, T + m
    dev = qk.device

    # 1. Hash: (B nh, n_hashes, T) buckets, piece by piece. Rounds live in their own tensor dim,
    #    so buckets of different rounds can never mix (the authors offset them by r * n_buckets
    #    in one long sequence).
    buckets = _hash(qk, n_buckets, n_hashes, rotations)

    # 2. Sort each round by (bucket, position), as in Part 1. sort_key is unique, so any sort is
    #    stable on it. The inverse permutation by a scatter instead of a second argsort.
    pos = torch.arange(T, device=dev)
    sort_key = buckets * T + pos                               # (B nh, n_hashes, T)
    sorted_pos = sort_key.argsort(dim=-1)                      # (B nh, n_hashes, T): slot -> i
    undo_sort = torch.empty_like(sorted_pos).scatter_(-1, sorted_pos, pos.expand(Bnh, n_hashes, T))

    # 4. (before 3, so that the keys are normalised once per position, not once per round)
    #    Chunk each round on its own; a chunk sees itself and the chunk before it *in the same
    #    round*, the first chunk the round's last one. trax and the Hugging Face port lay all
    #    rounds end to end, so there a round's first chunk sees the previous round's last chunk;
    #    keeping rounds apart makes each round an attention over a well-defined set, which is
    #    what lets us combine rounds exactly (step 9) and test each round against full attention.
    #    No mask by bucket inside the window (as the authors). Replaces Part 1's chunks() and
    #    look_one_back: each round gets a copy of its last chunk in front (the chunk layout), so
    #    every window is a strided view; ext lists the positions in that order.
    ext = torch.cat([sorted_pos[..., -m:], sorted_pos], dim=-1)  # (B nh, n_hashes, L)
    # Row bookkeeping, all small int64 tensors. The inputs are read as rows of (B T nh, d): the
    # row of position p of problem (b, h) is (b T + p) nh + h. The layout has B nh n_hashes
    # rounds of L rows; position t of problem (b, h) sits in round r at row
    # ((b nh + h) n_hashes + r) L + m + undo_sort.
    bh = torch.arange(Bnh, device=dev)
    x_rows = (ext + (bh // nh * T).view(Bnh, 1, 1)) * nh + (bh % nh).view(Bnh, 1, 1)
    main = undo_sort + (torch.arange(Bnh * n_hashes, device=dev) * L).view(Bnh, n_hashes, 1)
    grad_rows = (main + m).view(B, nh, n_hashes, T).permute(0, 3, 1, 2).contiguous()
    grad_rows = grad_rows.view(-1, n_hashes)                   # (B T nh, n_hashes)
    x_rows = x_rows.view(Bnh * n_hashes, L)
    # 3. Shared QK: k_hat = q / |q|; logit q . k_hat. (trax normalises k and divides by sqrt(hs)
    #    after an RMS norm: the same unit vector.)
    k_hat = _normalize(qk)                                     # (B, T, nh, hs)
    sort = lambda x: _SortRows.apply(x.reshape(B * T * nh, -1), x_rows, grad_rows, m)
    q_e, k_e, v_e = sort(qk), sort(k_hat), sort(v)             # (B nh n_hashes L, hs): the layout
    k_valid = None
    if padding_mask is not None:
        k_valid = _gather_rows(padding_mask.bool().repeat_interleave(nh, dim=0), ext).view(-1)

    # 5-7. Logits with the masks (self -1e5, future / padding -1e9), dedup's log N_ij, softmax:
    #    one Function over every window of every round (replaces Part 1's steps 5 to 7).
    log_counts = _dedup_log_counts(undo_sort, ext, m, qk.dtype) if dedup and n_hashes > 1 else None
    o_s, lse_s = _attend_in_chunks(q_e, k_e, v_e, ext.view(-1), m, k_valid, causal,
                                   shared_qk=True, scale=1.0, log_counts=log_counts,
                                   dropout=dropout, training=training)

    # 8-9. Undo the sort and combine rounds by their normalisers (not an average):
    #    o_i = sum_r exp(lse_i^(r) - logsumexp_r lse_i^(r)) o_i^(r), one Function (replaces Part
    #    1's unsort and combination). The output of slot s of round g is row g L + s of o_s
    #    (query chunk i is layout chunk i + 1).
    rows = main.view(B, nh, n_hashes, T).permute(0, 2, 3, 1).contiguous()
    rows = rows.view(B, n_hashes, T * nh)                      # layout rows in output order
    out = _UnsortCombine.apply(o_s.view(-1, o_s.shape[-1]), lse_s.view(-1), rows, L, m)
    out = out.view(B, T, nh, -1)                               # (B, T, nh, hs_v)

    # Memory: the largest tensors are the logits, (B nh n_hashes (n_chunks + 1) - 1, m, 2m),
    # about 2 B nh n_hashes T m floats: linear in T for a fixed bucket_size (the hash scores,
    # n_hashes T n_buckets / 2, grow as T^2 / m but are computed piece by piece in _hash), and
    # linear in n_hashes because all rounds go through one batched matmul. Looping over rounds
    # would keep one round's logits at a time (memory flat in n_hashes) but serialises n_hashes
    # small matmuls; we chose speed, since the reversible layers already keep activation memory
    # independent of depth.
    return out


def local_attention_fast(q, k, v, bucket_size, causal=False, padding_mask=None, shared_qk=False,
                         dropout=0.0, training=False):
    """local_attention (Part 1), fast: the same arguments and values, through _ChunkAttention."""
    _check_local_inputs(q, k, v, bucket_size, padding_mask, shared_qk)
    B, T, hs = q.shape
    m = bucket_size
    out_dtype = v.dtype
    q, k, v = _float32(q, k, v)
    if shared_qk:
        with _autocast_off(q):
            k, scale = _normalize(q), 1.0
    else:
        scale = 1.0 / math.sqrt(hs)
    # The chunk layout with one "round" per sequence: a dummy chunk in front of each (zeros,
    # masked as padding), since the first chunk has no chunk before it.
    front = lambda x, value=0: F.pad(x, (0, 0) * (x.dim() - 2) + (m, 0), value=value)
    flat = lambda x: front(x).reshape(B * (T + m), *x.shape[2:])
    pos = torch.arange(T, device=q.device).expand(B, T)
    real = torch.ones(B, T, dtype=torch.bool, device=q.device) if padding_mask is None \
        else padding_mask.bool()
    with _autocast_off(q):
        o, _ = _attend_in_chunks(flat(q), flat(k), flat(v), flat(pos), m,
                                 front(real, value=False).view(-1), causal, shared_qk, scale,
                                 dropout=dropout, training=training)
    # Position t of sequence b is row b * (T + m) + t of o.
    rows = (torch.arange(B, device=q.device).view(B, 1) * (T + m) + pos).view(-1)
    out = o.view(-1, o.shape[-1]).index_select(0, rows)
    return out.view(B, T, -1).to(out_dtype)


# -- full attention with separate keys: PyTorch's fused kernel, padding as an additive bias ------

def full_attention_fast(q, k, v, causal=False, padding_mask=None, dropout=0.0, training=False):
    """full_attention (Part 1) with separate keys, softmax(q k^T / sqrt(hs)) v, fast: one
    F.scaled_dot_product_attention over heads side by side, padding as an additive bias.
    q, k: (B, nh, T, hs), v: (B, nh, T, hs_v), padding_mask: (B, T), True at real tokens.
    Returns (B, nh, T, hs_v). The shared-QK conventions (unit keys, the -1e5 own logit) stay in
    Part 1: only this, the baseline Transformer's attention, has a fused kernel.

    A padded key's logit gets -1e9 added where Part 1 replaces it by -1e9: next to a real key
    exp() of either is exactly 0, so the two agree to rounding; and on a row with no real key
    -1e9 + logit rounds to -1e9 in float32, so both are uniform there. Half-precision inputs
    with a mask go to float32, as in Part 1 (half cannot hold -1e9)."""
    if q.dim() != 4 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"full_attention_fast: q, k must be (B, nh, T, hs) and v (B, nh, T, "
                         f"hs_v), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, nh, T, hs = q.shape
    p_drop = dropout if training else 0.0
    if padding_mask is None:             # no mask tensor: the flash kernel, causal or not
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=p_drop)
    if tuple(padding_mask.shape) != (B, T):
        raise ValueError(f"full_attention_fast: padding_mask must be (B, T) = {(B, T)}, got "
                         f"{tuple(padding_mask.shape)}")
    out_dtype = v.dtype
    q, k, v = _float32(q, k, v)
    bias = torch.zeros(B, 1, 1, T, dtype=q.dtype, device=q.device)
    bias.masked_fill_(~padding_mask.bool().view(B, 1, 1, T), MASKED_LOGIT)     # (B, 1, 1, T)
    if causal:
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        bias = bias.masked_fill(future, MASKED_LOGIT)                           # (B, 1, T, T)
    with _autocast_off(q):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p_drop)
    return out.to(out_dtype)


# ===============================================================================================
# Part 3. The multi-head layer
# ===============================================================================================

# The full-attention kinds: full_attention's shared-QK conventions (Part 1), one changed at a time
# and all together, to evaluate a model with the authors' dot-product attention and to name the
# convention that changes its result. "full" with shared_qk=False is the baseline Transformer.
FULL_KINDS = {
    "full":          dict(),                                   # ours: lsh_attention's conventions
    "full_scaled":   dict(scaled=True),                        # logits / sqrt(hs), only
    "full_self":     dict(mask_self=False),                    # a query may attend to itself, only
    "full_raw_keys": dict(unit_keys=False),                    # keys q, not q / |q|, only
    "full_dot":      dict(scaled=True, mask_self=False, unit_keys=False),  # the authors' (trax)
}
ATTN_KINDS = ("lsh", "full", "local", "full_scaled", "full_self", "full_raw_keys", "full_dot")
IMPLS = ("fast", "reference")   # Part 2 or Part 1: the same function (full attention: one only)


class LSHSelfAttention(nn.Module):
    """Multi-head self-attention with LSH, local or full attention over the same weights.

    `attn` and `n_hashes` are plain attributes: a model trained with LSH-4 can be evaluated with
    full attention or LSH-8 by setting them (paper Table 2). With shared_qk=True (the Reformer)
    one projection gives queries and keys; shared_qk=False (the baseline Transformer) adds a key
    projection and is valid with attn='full' or 'local' only, since LSH needs shared QK.
    forward pads T up to a multiple of 2 * bucket_size (lsh, local), masks the padding and returns
    T positions, so callers can use any length. impl='fast' runs lsh_attention_fast and
    local_attention_fast (Part 2), impl='reference' lsh_attention and local_attention (Part 1):
    the same outputs and gradients, so either can train the model.
    """

    def __init__(self, d_model, n_heads, *, bucket_size, n_hashes, causal=False, attn="lsh",
                 shared_qk=True, dropout=0.0, dedup=False, impl="fast"):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"LSHSelfAttention: d_model={d_model} must be divisible by "
                             f"n_heads={n_heads}")
        self.d_model, self.n_heads, self.hs = d_model, n_heads, d_model // n_heads
        self.bucket_size, self.n_hashes, self.causal = bucket_size, n_hashes, causal
        self.attn, self.shared_qk, self.dropout, self.dedup = attn, shared_qk, dropout, dedup
        self.impl = impl
        self._check()
        self.qk = nn.Linear(d_model, d_model, bias=False)     # queries (and keys when shared)
        self.k = None if shared_qk else nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model)

    def _check(self):
        if self.attn not in ATTN_KINDS:
            raise ValueError(f"LSHSelfAttention: attn={self.attn!r}, expected one of {ATTN_KINDS}")
        if self.impl not in IMPLS:
            raise ValueError(f"LSHSelfAttention: impl={self.impl!r}, expected one of {IMPLS}")
        if self.attn not in ("full", "local") and not self.shared_qk:
            raise ValueError(f"LSHSelfAttention: shared_qk=False is valid only with attn='full' or "
                             f"'local'; {self.attn!r} needs one vector per position (shared QK)")
        if self.n_hashes < 1:
            raise ValueError(f"LSHSelfAttention: n_hashes must be >= 1, got {self.n_hashes}")
        if self.bucket_size < 1:
            raise ValueError(f"LSHSelfAttention: bucket_size must be >= 1, got {self.bucket_size}")

    def _heads(self, x):
        B, T, _ = x.shape   # (B, T, C) -> (B * nh, T, hs): heads become batch rows
        return x.view(B, T, self.n_heads, self.hs).transpose(1, 2).reshape(B * self.n_heads, T, -1)

    def _qkv(self, x):
        """Queries, keys, values (B, nh, T, hs) each, from one (B, T, C) x (C, 3C) matmul: the
        weights of qk, k and v side by side (the parameters stay three, so a state dict loads
        either way). Separate keys only."""
        B, T, _ = x.shape
        w = torch.cat([self.qk.weight, self.k.weight, self.v.weight])     # (3C, C)
        qkv = F.linear(x, w).view(B, T, 3, self.n_heads, self.hs)          # (B, T, 3, nh, hs)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)                        # 3 x (B, nh, T, hs)

    def forward(self, x, padding_mask=None):
        self._check()   # attn / n_hashes may have been changed since construction
        B, T, C = x.shape
        if padding_mask is not None and tuple(padding_mask.shape) != (B, T):
            raise ValueError(f"LSHSelfAttention: padding_mask must be (B, T) = {(B, T)}, got "
                             f"{tuple(padding_mask.shape)}")
        # Pad T up to a multiple of 2 * bucket_size (LSH needs an even number of buckets)
        multiple = 2 * self.bucket_size if self.attn == "lsh" else self.bucket_size
        pad = (-T) % multiple if self.attn in ("lsh", "local") else 0
        if pad:
            x = F.pad(x, (0, 0, 0, pad))                       # (B, T + pad, C)
            real = torch.zeros(B, T + pad, dtype=torch.bool, device=x.device)
            real[:, :T] = True if padding_mask is None else padding_mask.bool()
            padding_mask = real
        drop = dict(dropout=self.dropout, training=self.training)
        nh, hs = self.n_heads, self.hs
        fast = self.impl == "fast"
        if self.attn == "lsh":
            # Project, and attend with heads side by side: (B, T', nh, hs), no transposes
            qk, v = self.qk(x).view(B, -1, nh, hs), self.v(x).view(B, -1, nh, hs)
            fn = lsh_attention_fast if fast else lsh_attention_heads
            y = fn(qk, v, self.bucket_size, self.n_hashes, causal=self.causal,
                   padding_mask=padding_mask, dedup=self.dedup, **drop)
        elif self.attn == "full" and not self.shared_qk and fast:
            # The baseline Transformer's attention: q, k, v (B, nh, T, hs) from one projection,
            # into the fused kernel, padding as a bias (Part 2's full_attention_fast)
            q, k, v = self._qkv(x)
            y = full_attention_fast(q, k, v, causal=self.causal, padding_mask=padding_mask,
                                    **drop).transpose(1, 2)              # (B, T, nh, hs)
        else:
            # Project, split heads into the batch: (B * nh, T', hs), and attend
            qk, v = self._heads(self.qk(x)), self._heads(self.v(x))
            k = None if self.shared_qk else self._heads(self.k(x))
            mask = None
            if padding_mask is not None:
                mask = padding_mask.bool().repeat_interleave(nh, dim=0)  # (B * nh, T')
            if self.attn == "local":
                fn, kw = local_attention_fast if fast else local_attention, dict(
                    bucket_size=self.bucket_size)
            else:
                fn, kw = full_attention, FULL_KINDS[self.attn]
            y = fn(qk, k, v, causal=self.causal, padding_mask=mask, shared_qk=self.shared_qk,
                   **kw, **drop)
            y = y.view(B, nh, -1, hs).transpose(1, 2)          # (B, T', nh, hs)
        # Merge heads, drop the padding, project out: (B, T, C)
        return self.out(y.reshape(B, -1, C)[:, :T])

    def extra_repr(self):
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, attn={self.attn!r}, "
                f"bucket_size={self.bucket_size}, n_hashes={self.n_hashes}, "
                f"causal={self.causal}, shared_qk={self.shared_qk}, dedup={self.dedup}, "
                f"impl={self.impl!r}")
