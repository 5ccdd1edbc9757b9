"""
The encoder-decoder Reformer for machine translation (Kitaev, Kaiser, Levskaya, ICLR 2020,
Section 5 and Table 4: WMT14 English-German), built from the same three concept files as the
language model in model.py, and fast exact decoding for it: greedy and beam search with a
key/value cache.

    encoder   non-causal self-attention (full, LSH or local: the `attn` / `attn_pattern` flags,
              padding masked), then the feed-forward; reversible when `reversible`
    decoder   causal self-attention, then cross-attention to the encoder output, then the
              feed-forward; reversible when `reversible`

Cross-attention (and the decoder's self-attention) is full attention: sentences are shorter than
an LSH chunk, which is also why the paper ran WMT without LSH. Documents could still use LSH or
local self-attention in the encoder.

Reversible decoder. The authors' trax decoder chains three reversible half-residuals per layer
(self-attention, cross-attention, feed-forward, each adding into the other stream). We keep
model.py's two-sub-layer block y1 = x1 + F(x2), y2 = x2 + G(y1) and put both attention steps in
F, as one function of x2 (each step pre-LayerNorm with its own residual inside F):

    a = SelfAttn(LN(x))        F(x) = a + CrossAttn(LN(x + a), memory)        G = FeedForward

F also reads the encoder output `memory`; reversible.py treats it as an input of the stack and
returns its gradient, so the decoder's activation memory stays flat in depth, as in the LM.

Decoding. The encoder runs once per batch. Each decoder layer keeps the keys and values of the
positions decoded so far (a cache, one new position per step) and the cross-attention keys and
values of the sentence (computed once); a step costs O(t) attention instead of rerunning the
decoder over the whole prefix, O(t^2). tests/test_encdec.py checks that the cached logits equal
the full recomputation, that beam size 1 equals greedy, that extra source padding changes
nothing (full or local encoder attention; with LSH the number of buckets follows the padded
length, so padding can move the chunk boundaries) and that the decoder is causal.

Shape legend: B batch (sentences; B * k rows in beam search), S source length, T target length,
C d_model, V vocab_size, nh heads, hs head size, k beam size.

    from translation.encdec import EncDecConfig, ReformerEncDec, beam_search, greedy_decode
    model = ReformerEncDec(EncDecConfig(vocab_size=8000))   # 3 + 3 layers, d 256
    logits, loss = model(src, tgt_in, targets)     # (B, S), (B, T), (B, T): -100 = not scored
    hyps = beam_search(model, src, beam_size=4, alpha=0.6)   # list of B token-id lists
"""
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from lsh_attention import MASKED_LOGIT, SELF_LOGIT, LSHSelfAttention
from chunked_ff import ACTIVATIONS
from model import (AttentionSublayer, FeedForwardSublayer, ModelConfig, ReformerLM, build_stack,
                   check_token_ids, logits_and_loss, model_from_checkpoint, positional_embedding,
                   run_layers, switch_attention, token_scale)

# Token ids every tokenizer of translation_data.py reserves: padding, start and end of sentence.
PAD, BOS, EOS = 0, 1, 2


def _default(name, value, help=None):
    """ModelConfig's field `name` with the translation model's default (and its help text)."""
    return field(default=value, metadata={"help": help or ModelConfig.__dataclass_fields__[name]
                                          .metadata["help"]})


ATTN_INITS = ("xavier", "normal")


@dataclass
class EncDecConfig(ModelConfig):
    """The translation model: a ModelConfig (the encoder's fields, which mean what they mean in
    the LM: n_layers is the encoder's depth) plus the decoder's. The defaults are a model a small
    corpus (~30K pairs) trains on a 2-core CPU in an hour: 3 + 3 layers, d 256; the paper's WMT14
    base model (6 + 6 layers, d 512) is configs/wmt14_*.args. Cross-attention and the decoder's
    self-attention are always full."""
    vocab_size: int = _default("vocab_size", 8000, "joint source/target vocabulary (sentencepiece "
                               "trains one of this size; bytes: 259)")
    max_seq_len: int = _default("max_seq_len", 128, "longest source or target sentence, in tokens "
                                "(paper: 256)")
    n_layers: int = _default("n_layers", 3, "encoder layers (paper Table 4: 6)")
    d_model: int = _default("d_model", 256)
    d_ff: int = _default("d_ff", 1024)
    dropout: float = _default("dropout", 0.1)
    attn: str = _default("attn", "full", "encoder self-attention: full, lsh or local (Section 2; "
                         "sentences are shorter than an LSH chunk, so the paper used full)")
    shared_qk: bool = _default("shared_qk", False)
    n_dec_layers: int = field(default=3, metadata={"help": "decoder layers (paper Table 4: 6)"})
    label_smoothing: float = field(default=0.1, metadata={"help": (
        "label smoothing of the training loss (Vaswani et al.: 0.1)")})
    attn_init: str = field(default="xavier", metadata={"help": (
        "the attention input projections (queries, keys, values): xavier, U(-a, a) with "
        "a = sqrt(6 / 4C) as nn.MultiheadAttention draws its packed (3C, C) matrix, or normal, "
        "N(0, 0.02) as every other weight (docs/translation_gap.md: normal learns less per step)")})

    def validate(self):
        """ModelConfig's checks for the encoder, then the decoder's."""
        super().validate()
        if self.rev_join != "mean":
            raise ValueError(f"rev_join={self.rev_join!r}: the encoder-decoder joins its "
                             f"reversible streams by their mean (as trax's Reformer does)")
        if self.n_dec_layers < 1:
            raise ValueError(f"n_dec_layers={self.n_dec_layers} must be >= 1")
        if self.vocab_size <= EOS:
            raise ValueError(f"vocab_size={self.vocab_size} must exceed the reserved ids "
                             f"PAD={PAD}, BOS={BOS}, EOS={EOS}")
        if self.attn_init not in ATTN_INITS:
            raise ValueError(f"attn_init={self.attn_init!r} is not one of {ATTN_INITS}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={self.label_smoothing} must be in [0, 1)")


# -----------------------------------------------------------------------------------------------
# Cross-attention, and the decoder's attention sub-layer
# -----------------------------------------------------------------------------------------------

def _split_heads(x, nh):
    B, T, C = x.shape
    return x.view(B, T, nh, C // nh).transpose(1, 2)                     # (B, nh, T, hs)


def _merge_heads(y):
    B, nh, T, hs = y.shape
    return y.transpose(1, 2).reshape(B, T, nh * hs)                      # (B, T, C)


class CrossAttention(nn.Module):
    """Multi-head attention from decoder positions (queries) to the encoder output (keys, values):

        CrossAttn(x, m) = W_o [softmax(Q_i K_i^T / sqrt(hs)) V_i]_i,   Q = x W_q, [K; V] = m W_kv

    Source padding is masked. kv(memory) is what decoding computes once per sentence.
    """

    def __init__(self, d_model, n_heads, dropout=0.0):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model)

    def memory_kv(self, memory):
        """memory (B, S, C) -> keys, values (B, nh, S, hs) each."""
        k, v = self.kv(memory).chunk(2, dim=-1)
        return _split_heads(k, self.n_heads), _split_heads(v, self.n_heads)

    @staticmethod
    def mask_bias(memory_mask, dtype):
        """memory_mask (B, S) -> the additive bias (B, 1, 1, S) of the softmax's logits. Masked
        keys get a finite -1e9, as in lsh_attention: exp() of it is exactly 0 in float32, so
        extra padding changes nothing, and no row is NaN."""
        bias = torch.zeros(memory_mask.shape, dtype=dtype, device=memory_mask.device)
        return bias.masked_fill(~memory_mask, MASKED_LOGIT)[:, None, None, :]

    def forward(self, x, memory_mask, memory):
        """x (B, T, C), memory (B, S, C), memory_mask (B, S), True at real tokens -> (B, T, C).
        Decoding computes memory_kv and mask_bias once per sentence (decoder_f_step)."""
        k, v = self.memory_kv(memory)                                    # (B, nh, S, hs)
        q = _split_heads(self.q(x), self.n_heads)                       # (B, nh, T, hs)
        bias = self.mask_bias(memory_mask, q.dtype)                      # (B, 1, 1, S)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        return self.out(_merge_heads(y))


class DecoderAttentionSublayer(nn.Module):
    """The decoder's F: causal self-attention, then cross-attention, one function of x:

        a = SelfAttn(LN1(x))            F(x) = a + dropout(CrossAttn(LN2(x + a), memory))

    Decoding computes the same function one position at a time: decoder_f_step."""

    def __init__(self, cfg):
        super().__init__()
        self.self_attn = AttentionSublayer(cfg, "full", causal=True)
        self.ln = nn.LayerNorm(cfg.d_model)
        self.cross = CrossAttention(cfg.d_model, cfg.n_heads, cfg.rate("attn_dropout"))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, memory_mask, memory):
        a = self.self_attn(x)                                            # (B, T, C)
        c = self.cross(self.ln(x + a), memory_mask, memory=memory)
        return a + self.drop(c)


# -----------------------------------------------------------------------------------------------
# The model
# -----------------------------------------------------------------------------------------------

def attention_in_projections(model):
    """The weight matrices that make queries, keys and values: LSHSelfAttention's qk, k, v and
    CrossAttention's q, kv (not the output projections)."""
    for m in model.modules():
        if isinstance(m, LSHSelfAttention):
            yield from (lin.weight for lin in (m.qk, m.k, m.v) if lin is not None)
        elif isinstance(m, CrossAttention):
            yield from (m.q.weight, m.kv.weight)


def xavier_attention_init_(model):
    """U(-a, a), a = sqrt(6 / (C + 3C)), for the attention input projections: the draw of
    nn.MultiheadAttention's packed (3C, C) in_proj_weight, std sqrt(1 / 2C) (0.044 at C = 256).
    With N(0, 0.02) a query's initial logits have std about 0.02^2 C (0.1 at C = 256), so every
    query starts attending almost uniformly and the model learns less per step."""
    a = math.sqrt(6 / (4 * model.config.d_model))
    with torch.no_grad():
        for w in attention_in_projections(model):
            w.uniform_(-a, a)
    return model


class ReformerEncDec(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = cfg = config
        self.src_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.tgt_emb = self.src_emb if cfg.tie_weights else nn.Embedding(cfg.vocab_size,
                                                                         cfg.d_model)
        self.pos_emb = positional_embedding(cfg)                         # shared: (T, C)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = build_stack([(AttentionSublayer(cfg, kind, causal=False),
                                     FeedForwardSublayer(cfg)) for kind in cfg.layer_attn()],
                                   cfg.reversible)
        self.ln_enc = nn.LayerNorm(cfg.d_model)
        self.decoder = build_stack([(DecoderAttentionSublayer(cfg), FeedForwardSublayer(cfg))
                               for _ in range(cfg.n_dec_layers)], cfg.reversible)
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(ReformerLM._init_weights)
        if cfg.attn_init == "xavier":
            xavier_attention_init_(self)
        if cfg.tie_weights:
            self.lm_head.weight = self.tgt_emb.weight   # one (V, C) matrix, in and out

    def _embed(self, emb, idx, name):
        check_token_ids(idx, self.config.vocab_size, self.config.max_seq_len, name)
        return self.drop(token_scale(self.config) * emb(idx) + self.pos_emb(idx.shape[1]))

    def encode(self, src):
        """src (B, S) with PAD after each sentence -> memory (B, S, C), memory_mask (B, S)."""
        memory_mask = src != PAD
        x = self._embed(self.src_emb, src, "src")
        x = run_layers(self.encoder, x, self.config.reversible, padding_mask=memory_mask)
        return self.ln_enc(x), memory_mask

    def decode(self, tgt_in, memory, memory_mask):
        """tgt_in (B, T), BOS first -> the final-LayerNorm hidden states (B, T, C)."""
        x = self._embed(self.tgt_emb, tgt_in, "tgt_in")
        x = run_layers(self.decoder, x, self.config.reversible, memory=memory,
                       memory_mask=memory_mask)
        return self.ln_f(x)

    def forward(self, src, tgt_in, targets=None):
        """src (B, S), tgt_in (B, T) = [BOS, y_1 .. y_{T-1}], targets (B, T) = [y_1 .. y_T] with
        -100 at padding. Returns (logits (B, T, V) or None with ff_chunks > 1, loss or None);
        the loss is label-smoothed (config.label_smoothing)."""
        memory, memory_mask = self.encode(src)
        h = self.decode(tgt_in, memory, memory_mask)                     # (B, T, C)
        return logits_and_loss(h, self.lm_head, targets, self.config.ff_chunks,
                               self.config.label_smoothing)

    # -- incremental decoding ------------------------------------------------------------------

    def _decoder_layers(self):
        return self.decoder.blocks if self.config.reversible else self.decoder

    def start_cache(self, memory, memory_mask, max_len, repeat=1):
        """A decoding cache for max_len target positions and `repeat` rows (beams) a sentence:
        per decoder layer, self-attention keys/values (B * repeat, nh, max_len, hs), a spare
        buffer of each for reorder_cache, the layer's step_weights, and the cross-attention
        keys/values of memory (B, nh, S, hs) and its mask bias, computed once per sentence and
        shared by its beams (decoder_f_step); the positional embeddings of all max_len
        positions; and the output layer's weight transposed, (C, V), for step's matmul. The transposed matrices are copies: a cache is for one
        decoding, with the model unchanged. Positions >= t of the keys/values are never read, so
        the buffers start uninitialised."""
        B, C, nh = memory.shape[0], self.config.d_model, self.config.n_heads
        shape = (B * repeat, nh, max_len, C // nh)
        bias = CrossAttention.mask_bias(memory_mask, memory.dtype)       # (B, 1, 1, S)
        layers = []
        for layer in self._decoder_layers():
            layers.append({**{name: memory.new_empty(shape) for name in
                              ("k", "v", "k_spare", "v_spare")},
                           "memory_kv": layer.f.cross.memory_kv(memory),   # (B, nh, S, hs) x 2
                           "memory_bias": bias, **step_weights(layer)})
        return {"layers": layers, "memory_mask": memory_mask, "beams": repeat,
                "pos": self.pos_emb(max_len),                                   # (max_len, C)
                "lm_head_t": self.lm_head.weight.t().contiguous()}               # (C, V)

    def step(self, token, t, cache):
        """Logits (B, V) of the token after position t, given token (B,) at position t and the
        cache filled for positions < t (this call fills position t). Exactly the logits at t of
        forward() run on the whole prefix, in eval mode (tests/test_encdec.py)."""
        cfg = self.config
        x = self.tgt_emb(token) * token_scale(cfg) + cache["pos"][t]               # (B, C)
        if cfg.reversible:
            x1 = x2 = x
            for c in cache["layers"]:
                x1 = x1 + decoder_f_step(x2, c, t)                       # y1 = x1 + F(x2)
                x2 = x2 + decoder_g_step(x1, c)                          # y2 = x2 + G(y1)
            x = 0.5 * (x1 + x2)
        else:
            for c in cache["layers"]:
                x = x + decoder_f_step(x, c, t)
                x = x + decoder_g_step(x, c)
        # lm_head as h @ W^T with W^T stored (C, V), as the layers' weights (step_weights); this
        # matmul is the largest of a step.
        return _layer_norm(self.ln_f, x) @ cache["lm_head_t"]            # (B, V)

    @staticmethod
    def reorder_cache(cache, rows, n):
        """Row i of the cache becomes row rows[i]: beam search's new beams continue old ones, and
        both decoders drop the rows of finished sentences (rows then lists fewer rows), so later
        steps compute only the live ones. n: the positions filled so far.

        Only the filled prefix :n of the self-attention keys/values moves, with index_select
        into the spare buffer, which then becomes the live one (the two swap roles every step).
        Copying into place would need a temporary (the source rows overlap the destination), and
        `k[rows]` copies all max_len positions; the spare costs one more buffer of memory. A
        per-row index of parents (no copy, a gather inside attention) would read as much every
        step and make attention less plain. The cross-attention keys/values are kept once per
        sentence, for all its beams, so they move only when sentences leave: the k rows of each
        new group continue one sentence, the one of its first row."""
        k = cache["beams"]
        shrink = len(rows) != len(cache["memory_mask"]) * k
        if shrink:
            sentences = rows[::k] // k                                   # (B',)
            cache["memory_mask"] = cache["memory_mask"].index_select(0, sentences)
            bias = cache["layers"][0]["memory_bias"].index_select(0, sentences)   # all layers
        for layer in cache["layers"]:
            for name in ("k", "v"):
                live, spare = layer[name], layer[name + "_spare"][:len(rows)]
                torch.index_select(live[:, :, :n], 0, rows, out=spare[:, :, :n])
                layer[name], layer[name + "_spare"] = spare, live
            if shrink:
                layer["memory_kv"] = tuple(m.index_select(0, sentences)
                                           for m in layer["memory_kv"])
                layer["memory_bias"] = bias

    def set_attention(self, attn=None, n_hashes=None):
        """Switch the encoder's self-attention after training (paper Table 2); the decoder's
        self-attention stays full (its cache needs it)."""
        self.config = switch_attention(self.encoder, self.config, attn, n_hashes)

    def num_params(self):
        """Parameter count, each shared tensor once (tied embeddings counted once)."""
        return sum(p.numel() for p in self.parameters())

    def config_dict(self):
        return asdict(self.config)

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu"):
        return model_from_checkpoint(cls, EncDecConfig, path, map_location)


# -----------------------------------------------------------------------------------------------
# One decoder position at a time: a layer's F and G from its cache (ReformerEncDec.step)
# -----------------------------------------------------------------------------------------------

def step_weights(layer):
    """The weights a decoding step reads, for one decoder layer (F, G): each matrix transposed
    and contiguous, (in, out), so that a step is x @ W matmuls (torch.addmm with the bias) that
    read W in its stored order, with no nn.Module calls. On a CPU at B = 16..64 rows that is
    about a third faster than nn.Linear; a step is mostly these small matmuls. The self-attention's
    input projections sit side by side, (C, 3C) (q, k, v; shared QK: (C, 2C), qk and v): one
    matmul instead of three. Made once per decoding (start_cache), from the model as it is."""
    f, g = layer.f, layer.g
    sa, cross, ff = f.self_attn, f.cross, g.ff
    t = lambda lin: lin.weight.t().contiguous()
    ws = [sa.attn.qk.weight] + ([] if sa.attn.shared_qk else [sa.attn.k.weight]) + \
        [sa.attn.v.weight]
    return {"attn": sa.attn, "ln_sa": sa.ln, "w_in": torch.cat(ws).t().contiguous(),
            "w_out": t(sa.attn.out), "b_out": sa.attn.out.bias,
            "ln_cross": f.ln, "w_q": t(cross.q), "w_cross_out": t(cross.out),
            "b_cross_out": cross.out.bias, "n_heads": cross.n_heads,
            "ln_ff": g.ln, "w1": t(ff.w1), "b1": ff.w1.bias, "w2": t(ff.w2), "b2": ff.w2.bias,
            "act": ACTIVATIONS[ff.activation]}


def _linear(x, w, b=None):
    """x (N, in) @ w (in, out) + b: nn.Linear on a step_weights matrix."""
    return torch.mm(x, w) if b is None else torch.addmm(b, x, w)


def _layer_norm(ln, x):
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def self_attention_step(x, cache, t):
    """Position t of lsh_attention.LSHSelfAttention(attn='full', causal=True) from a cache.

    x: (B, C), the layer input at position t (after the LayerNorm). cache['k'], cache['v']: (B,
    nh, T_max, hs), positions < t filled by earlier steps; this step writes position t. The
    projections are the layer's step_weights. The softmax over keys 0..t is the row t of
    full_attention's causal softmax, with its conventions: shared QK keys are q / |q| with no
    1/sqrt(hs) and a query's own logit replaced by -1e5; separate keys are scaled by 1/sqrt(hs).
    Returns (B, C).
    """
    attn = cache["attn"]
    B, C = x.shape
    n = 3 - attn.shared_qk                       # projections: q, k, v or (shared QK) qk, v
    # With one position, (B, 1, nh, hs) and (B, nh, 1, hs) are the same memory: views only.
    proj = (x @ cache["w_in"]).view(B, n, attn.n_heads, 1, attn.hs).unbind(1)
    q, v = proj[0], proj[-1]                                             # (B, nh, 1, hs) each
    k = F.normalize(q, dim=-1) if attn.shared_qk else proj[1]
    cache["k"][:, :, t:t + 1] = k
    cache["v"][:, :, t:t + 1] = v
    keys, values = cache["k"][:, :, :t + 1], cache["v"][:, :, :t + 1]  # (B, nh, t + 1, hs)
    if not attn.shared_qk:             # softmax(q k^T / sqrt(hs)) v: the fused kernel, no mask
        y = F.scaled_dot_product_attention(q, keys, values)              # (B, nh, 1, hs)
    else:
        logits = torch.matmul(q, keys.transpose(-1, -2))                # (B, nh, 1, t + 1)
        logits[..., t] = SELF_LOGIT
        y = torch.matmul(torch.softmax(logits, dim=-1), values)         # (B, nh, 1, hs)
    return _linear(y.view(B, C), cache["w_out"], cache["b_out"])


def decoder_f_step(x, cache, t):
    """The decoder's F (DecoderAttentionSublayer) at position t from its layer's cache
    (start_cache): x (B, C) -> (B, C), the same function as in training, without dropout
    (decoding runs in eval mode):  a = SelfAttn(LN(x));  F(x) = a + CrossAttn(LN(x + a), memory).
    In beam search x has k rows a sentence (B k, C), and the cross-attention keys and values are
    kept once per sentence: its k beams attend as k query positions of the sentence's row, so
    each sentence's keys and values are read once a step, not once per beam."""
    a = self_attention_step(_layer_norm(cache["ln_sa"], x), cache, t)
    h = _layer_norm(cache["ln_cross"], x + a)                            # (B k, C)
    k_mem, v_mem = cache["memory_kv"]                                    # (B, nh, S, hs) each
    Bk, C = h.shape
    B, nh = k_mem.shape[0], cache["n_heads"]
    q = _linear(h, cache["w_q"]).view(B, -1, nh, C // nh).transpose(1, 2)   # (B, nh, k, hs)
    y = F.scaled_dot_product_attention(q, k_mem, v_mem, attn_mask=cache["memory_bias"])
    return a + _linear(y.transpose(1, 2).reshape(Bk, C), cache["w_cross_out"],
                       cache["b_cross_out"])


def decoder_g_step(x, cache):
    """The decoder's G (FeedForwardSublayer) from its layer's cache: W2 act(W1 LN(x) + b1) + b2,
    x (B, C) -> (B, C)."""
    h = cache["act"](_linear(_layer_norm(cache["ln_ff"], x), cache["w1"], cache["b1"]))
    return _linear(h, cache["w2"], cache["b2"])


# -----------------------------------------------------------------------------------------------
# Decoding: greedy and beam search, batched, the encoder run once
# -----------------------------------------------------------------------------------------------

def _max_len(model, src, max_len):
    """Target positions to decode: S + 50 by default (tensor2tensor's decode_length), at most
    max_seq_len (the positional embedding's reach)."""
    return min(model.config.max_seq_len, max_len or src.shape[1] + 50)


def _check_min_len(min_len):
    if not isinstance(min_len, int) or min_len < 0:
        raise ValueError(f"min_len={min_len!r} must be an integer >= 0 (the fewest tokens "
                         f"before EOS; 0 allows an empty output)")


def _next_token_logp(model, tokens, t, memory, memory_mask, cache, min_len=0, log_probs=True):
    """log P (B, V) of the token at position t + 1 given tokens (B, t + 1), from the cache, or
    (cache None) by rerunning the decoder over the whole prefix. PAD and BOS are never a next
    token (no target is either), nor EOS before min_len tokens (t < min_len): they get -inf,
    after the softmax, so the other tokens keep the model's log-probabilities. log_probs=False
    returns the logits, banned tokens -inf, for greedy decoding: log_softmax subtracts one number
    per row, which keeps their order (its rounding could only make a near-tie a tie), so the
    argmax is the same without the softmax's pass over the vocabulary."""
    if cache is not None:
        logits = model.step(tokens[:, -1], t, cache)                     # (B, V)
    else:
        logits = model.lm_head(model.decode(tokens, memory, memory_mask)[:, -1])
    logp = F.log_softmax(logits.float(), dim=-1) if log_probs else logits.float()
    banned = [PAD, BOS, EOS] if t < min_len else [PAD, BOS]
    return logp.index_fill_(1, torch.tensor(banned, device=logp.device), -math.inf)


def _strip(ids):
    """A decoded row without its leading BOS, cut at the first EOS (or PAD): the token ids to
    detokenise."""
    out = []
    for i in ids[1:]:
        if i in (EOS, PAD):
            break
        out.append(i)
    return out


@torch.no_grad()
def greedy_decode(model, src, max_len=None, use_cache=True, min_len=1):
    """The argmax token at every step, for a batch src (B, S), at least min_len tokens before
    EOS (1: never an empty output). use_cache=False reruns the decoder over the whole prefix at
    every step (the reference, and bench.py's baseline). A sentence that reaches EOS leaves the
    batch: later steps compute only the others. Returns B lists of token ids, EOS removed."""
    _check_min_len(min_len)
    model.eval()
    memory, memory_mask = model.encode(src)
    B, L = src.shape[0], _max_len(model, src, max_len)
    out = torch.full((B, L + 1), PAD, dtype=torch.long, device=src.device)
    out[:, 0] = BOS
    live = torch.arange(B, device=src.device)          # the rows of src still decoding
    cache = model.start_cache(memory, memory_mask, L) if use_cache else None
    for t in range(L):
        prefix = out[live, :t + 1]                                       # (B_live, t + 1)
        # max(-1).indices: the first of equal maxima, as argmax, at a third of argmax's cost
        nxt = _next_token_logp(model, prefix, t, memory, memory_mask, cache, min_len,
                               log_probs=False).max(-1).indices
        out[live, t + 1] = nxt
        going = (nxt != EOS).nonzero()[:, 0]
        if len(going) == 0:
            break
        if len(going) < len(live):                     # some finished: drop their rows
            live = live[going]
            if use_cache:
                model.reorder_cache(cache, going, t + 1)
            else:
                memory, memory_mask = memory[going], memory_mask[going]
    return [_strip(row) for row in out.tolist()]


def length_penalty(length, alpha):
    """GNMT's (Wu et al. 2016, eq. 14) lp(Y) = ((5 + |Y|) / 6)^alpha; a hypothesis is ranked by
    log P(Y | X) / lp(Y). alpha = 0: plain log-probability, which favours short outputs."""
    return ((5.0 + length) / 6.0) ** alpha


@torch.no_grad()
def beam_search(model, src, beam_size=4, alpha=0.6, max_len=None, return_scores=False,
                min_len=1):
    """Beam search for a batch src (B, S): beam_size hypotheses per sentence, ranked by
    log P(Y | X) / length_penalty(|Y|) (defaults: Vaswani et al.'s beam 4, alpha 0.6), each at
    least min_len tokens before EOS (1: never an empty output).

    Each step extends the k live hypotheses of every sentence by every token and takes the 2k
    best extensions (by log-probability). An extension ending in EOS that ranks among the first
    k is finished; the k best that do not end stay alive (there are at least k of the 2k, since
    each live hypothesis has one EOS extension). A sentence is done when it has k finished
    hypotheses, and its answer is the best of them by the length-penalised score; after max_len
    steps the live ones compete too. These are fairseq's rules; with k = 1 they make beam search
    exactly greedy decoding, for any alpha (tests/test_encdec.py). (tensor2tensor instead keeps
    searching while a live hypothesis could still beat a finished one.) A done sentence leaves
    the batch: its k rows are dropped from the cache, and later steps compute only the others.
    Returns B lists of token ids, EOS and padding removed (and, with return_scores, a (B,)
    tensor of their scores: log P / length_penalty, EOS included in both when it was reached).
    """
    V, k = model.config.vocab_size, beam_size
    if k < 1 or 2 * k > V - 2:
        raise ValueError(f"beam_size={beam_size} must be >= 1 and at most (vocab_size - 2) / 2 "
                         f"= {(V - 2) // 2}: each step keeps 2k of the V - 2 possible tokens")
    _check_min_len(min_len)
    model.eval()
    memory, memory_mask = model.encode(src)
    B, L, dev = src.shape[0], _max_len(model, src, max_len), src.device
    cache = model.start_cache(memory, memory_mask, L, repeat=k)
    live = torch.arange(B, device=dev)                 # the sentences still searching
    seqs = torch.full((B, k, 1), BOS, dtype=torch.long, device=dev)     # their live hypotheses
    # Only beam 0 starts alive: k copies of the same start would fill the beam with duplicates.
    alive = torch.full((B, k), -1e9, device=dev)
    alive[:, 0] = 0.0                                                    # log P of each live one
    done_seqs = torch.full((B * k, L + 1), PAD, dtype=torch.long, device=dev)
    done_score = torch.full((B * k,), -math.inf, device=dev)            # k slots per sentence
    n_done = torch.zeros(B, dtype=torch.long, device=dev)
    first_k = torch.arange(2 * k, device=dev) < k
    for t in range(L):
        Bl = len(live)                                                   # live sentences
        logp = _next_token_logp(model, seqs.view(Bl * k, -1), t, None, None, cache, min_len)
        cand = (alive[:, :, None] + logp.view(Bl, k, V)).view(Bl, k * V)  # (Bl, k V)
        top, idx = cand.topk(2 * k, dim=-1)                              # (Bl, 2k), best first
        origin, token = idx // V, idx % V
        ext = torch.cat([seqs.gather(1, origin[:, :, None].expand(-1, -1, t + 1)),
                         token[:, :, None]], dim=2)                      # (Bl, 2k, t + 2)
        is_eos = token == EOS
        # 1) finish the EOS extensions among the first k, into the sentence's free slots
        finish = is_eos & first_k                                        # (Bl, 2k)
        slot = n_done[live][:, None] + finish.cumsum(1) - 1
        finish &= slot < k
        b, c = finish.nonzero(as_tuple=True)
        rows = live[b] * k + slot[b, c]
        done_score[rows] = top[b, c] / length_penalty(t + 1, alpha)
        done_seqs[rows, :t + 2] = ext[b, c]
        n_done[live] += finish.sum(1)
        # 2) alive: the k best extensions that did not end
        alive, j = torch.where(is_eos, -math.inf, top).topk(k, dim=-1)   # (Bl, k)
        seqs = ext.gather(1, j[:, :, None].expand(-1, -1, t + 2))
        # 3) sentences with k finished hypotheses leave; the others' beams pick their cache rows
        going = (n_done[live] < k).nonzero()[:, 0]                       # (Bl',)
        if len(going) == 0:
            break
        live, alive, seqs = live[going], alive[going], seqs[going]
        model.reorder_cache(cache, (going[:, None] * k + origin.gather(1, j)[going]).view(-1),
                            t + 1)
    # Sentences not done after max_len steps: their live hypotheses compete as they are.
    live_score = torch.full((B, k), -math.inf, device=dev)
    if len(live):
        open_ = (n_done[live] < k)[:, None] & (alive > -1e8)
        live_score[live] = torch.where(open_, alive / length_penalty(seqs.shape[2] - 1, alpha),
                                       -math.inf)
    scores = torch.cat([done_score.view(B, k), live_score], 1)           # (B, 2k)
    best_score, best = scores.max(1)
    done_seqs = done_seqs.view(B, k, -1)
    where = {b: i for i, b in enumerate(live.tolist())}   # sentence -> its row in seqs
    seqs = seqs.tolist()
    hyps = [_strip(done_seqs[b, i].tolist() if i < k else seqs[where[b]][i - k])
            for b, i in enumerate(best.tolist())]
    return (hyps, best_score) if return_scores else hyps
