"""
The Reformer language model (Kitaev, Kaiser, Levskaya, ICLR 2020: Section 2 LSH attention,
Section 3 reversible layers and chunking, Section 5 the experiments), built from the three
concept files:
    lsh_attention.py  LSH / local / full self-attention      (the attention sub-layer, F)
    reversible.py     reversible residual layers             (y1 = x1 + F(x2), y2 = x2 + G(y1))
    chunked_ff.py     chunked feed-forward and output layer  (the feed-forward sub-layer, G)

One model class, one config dataclass. The baseline Transformer is the same class with the
Reformer ideas switched off, so every ablation of the paper is one field (and one train.py flag):
    attn='full', shared_qk=False, reversible=False, ff_chunks=1   the Transformer
    attn='lsh',  shared_qk=True,  reversible=True,  ff_chunks=4   the Reformer
The config field names equal the train.py flag names, so `grep reversible` finds both.

Shape legend: B batch, T time, C d_model, V vocab_size.

    from model import ModelConfig, ReformerLM
    model = ReformerLM(ModelConfig(vocab_size=258, max_seq_len=4096, n_layers=3, attn='lsh'))
    logits, loss = model(idx, targets)            # idx, targets: (B, T) int64
"""
import math
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from chunked_ff import ChunkedFeedForward, chunked_cross_entropy
from lsh_attention import ATTN_KINDS, IMPLS, LSHSelfAttention
from reversible import ReversibleBlock, ReversibleSequence

POS_EMBS = ("axial", "absolute", "sinusoidal")
REV_JOINS = ("mean", "concat")


@dataclass
class ModelConfig:
    """One field per ablation of the paper; train.py makes each one a flag of the same name, with
    the help text below. The defaults are `python train.py`'s run: an LSH Reformer that learns the
    duplication task on a 2-core CPU in minutes. The paper's sizes are in configs/*.args (Table 2:
    configs/duplication_*.args). A config checks itself when it is made (validate)."""
    vocab_size: int = field(default=16, metadata={"help": (
        "vocabulary: symbols 0..V-1 of the duplication task (Table 2: 128; train.py's default "
        "run: 16), 258 for bytes (enwik8, text; 2 reserved ids)")})
    max_seq_len: int = field(default=1024, metadata={"help": (
        "longest sequence the position embedding covers; train.py: None = --seq_len")})
    n_layers: int = field(default=2, metadata={"help": (
        "layers (Table 2: 1; enwik8 ablations, Figures 3-5: 3; Section 5: 12)")})
    d_model: int = field(default=64, metadata={"help": (
        "model width (Table 2: 256; enwik8 ablations: 1024)")})
    n_heads: int = field(default=4, metadata={"help": "attention heads (Table 2: 4; enwik8: 8)"})
    d_ff: int = field(default=128, metadata={"help": (
        "feed-forward width (Table 2: 256; enwik8: 4096)")})
    dropout: float = field(default=0.0, metadata={"help": (
        "dropout on the embeddings and every sub-layer's output, and by default on the "
        "attention weights and the FF hidden layer too; the reversible backward replays its "
        "masks exactly (enwik8: 0.1-0.2)")})
    attn_dropout: float = field(default=None, metadata={"type": float, "help": (
        "dropout on the attention weights; None: --dropout")})
    relu_dropout: float = field(default=None, metadata={"type": float, "help": (
        "dropout on the feed-forward hidden layer; None: --dropout")})
    attn: str = field(default="lsh", metadata={"help": (
        "attention in every layer: lsh (Section 2), full (the baseline of Table 2, Figure 5) "
        "or local; for evaluation also full_dot (the authors' dot-product attention: "
        "q.k / sqrt(hs), self allowed, keys not normalised) and full_scaled, full_self, "
        "full_raw_keys (one of those conventions each)")})
    attn_pattern: str = field(default="", metadata={"help": (
        "per-layer attention cycled over the layers, e.g. local,local,lsh,local (the authors' "
        "enwik8 model); '' = attn everywhere")})
    shared_qk: bool = field(default=True, metadata={"help": (
        "shared queries and keys (Section 2, Figure 3 left; required by LSH); False: full/local "
        "only")})
    n_hashes: int = field(default=4, metadata={"help": (
        "LSH hash rounds (Section 2, multi-round LSH; Table 2, Figure 4)")})
    bucket_size: int = field(default=8, metadata={"help": (
        "LSH/local chunk length m: a query sees 2m keys per round (Section 2; paper: 64)")})
    dedup: bool = field(default=False, metadata={"help": (
        "count a key that several hash rounds find only once (Section 2, multi-round LSH)")})
    reversible: bool = field(default=True, metadata={"help": (
        "reversible residual layers (Section 3, Figure 3 right; memory independent of depth); "
        "False: ordinary ones")})
    ff_chunks: int = field(default=1, metadata={"help": (
        "feed-forward layer and output loss in chunks along T (Section 3; Table 3)")})
    pos_emb: str = field(default="absolute", metadata={"help": (
        "position embedding: absolute (learned), axial (the authors' trax code; not in the "
        "paper) or sinusoidal. Absolute by default: in the duplication task the copy sits T/2 "
        "back, an offset that axial rows and columns cannot express for every position")})
    axial_shape: str = field(default="", metadata={"help": (
        "axial position factors, e.g. 32,32 for max_seq_len 1024; '' derives them")})
    tie_weights: bool = field(default=True, metadata={"help": (
        "share the input embedding matrix with the output layer")})
    rev_join: str = field(default="mean", metadata={"help": (
        "how the two reversible streams become one before the output layer: mean (width C, "
        "the output layer may be tied; the fastai reproduction) or concat (LayerNorm(2C) and an "
        "untied Linear(2C, V), as trax's ReformerLM and Hugging Face do)")})
    impl: str = field(default="fast", metadata={"help": (
        "which implementation of LSH attention: 'fast' (Part 2 of lsh_attention.py) or "
        "'reference' (the readable Part 1), equal to 1e-10")})

    def __post_init__(self):
        self.validate()   # every way in (the flags, a checkpoint, dataclasses.replace) is checked

    def layer_attn(self):
        """The attention kind of every layer: attn_pattern cycled over n_layers, or attn."""
        pattern = [a.strip() for a in self.attn_pattern.split(",") if a.strip()] or [self.attn]
        return [pattern[i % len(pattern)] for i in range(self.n_layers)]

    def axial_dims(self):
        """(rows, cols) of the axial embedding, rows * cols == max_seq_len."""
        if self.axial_shape:
            try:
                shape = tuple(int(s) for s in self.axial_shape.split(","))
            except ValueError:
                shape = ()
            if len(shape) != 2 or math.prod(shape) != self.max_seq_len:
                raise ValueError(f"axial_shape={self.axial_shape!r} must be two integers "
                                 f"'a,b' with a * b == max_seq_len={self.max_seq_len}")
            return shape
        rows = max(d for d in range(1, math.isqrt(self.max_seq_len) + 1)
                   if self.max_seq_len % d == 0)   # the most square factorisation
        return rows, self.max_seq_len // rows

    def validate(self):
        """Raise ValueError naming the bad value and what would be valid."""
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        for kind in self.layer_attn():
            if kind not in ATTN_KINDS:
                raise ValueError(f"attention kind {kind!r} (attn={self.attn!r}, attn_pattern="
                                 f"{self.attn_pattern!r}) is not one of {ATTN_KINDS}")
        if "lsh" in self.layer_attn() and not self.shared_qk:
            raise ValueError("shared_qk=False is valid only without LSH layers: LSH attention "
                             "hashes one shared query/key vector per position")
        if self.impl not in IMPLS:
            raise ValueError(f"impl={self.impl!r} is not one of {IMPLS}")
        if self.pos_emb not in POS_EMBS:
            raise ValueError(f"pos_emb={self.pos_emb!r} is not one of {POS_EMBS}")
        if self.pos_emb == "axial":
            self.axial_dims()
        for name in ("vocab_size", "max_seq_len", "n_layers", "d_model", "n_heads", "d_ff",
                     "n_hashes", "bucket_size", "ff_chunks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.rev_join not in REV_JOINS:
            raise ValueError(f"rev_join={self.rev_join!r} is not one of {REV_JOINS}")
        if self.rev_join == "concat" and not self.reversible:
            raise ValueError("rev_join='concat' joins the two streams of reversible layers: it "
                             "needs reversible=True (ordinary layers have one stream)")
        if self.rev_join == "concat" and self.tie_weights:
            raise ValueError("rev_join='concat' gives a (V, 2C) output layer, which cannot be "
                             "tied to the (V, C) embedding: add tie_weights=False")
        for name in ("dropout", "attn_dropout", "relu_dropout"):
            p = getattr(self, name)
            if p is not None and not 0.0 <= p < 1.0:
                raise ValueError(f"{name}={p} must be in [0, 1)")

    def rate(self, name):
        """The dropout rate `name` (attn_dropout or relu_dropout) stands for: --dropout if None."""
        p = getattr(self, name)
        return self.dropout if p is None else p


# -----------------------------------------------------------------------------------------------
# Positional embeddings
# -----------------------------------------------------------------------------------------------

class AxialPositionalEmbedding(nn.Module):
    """The factorised ("axial") position embedding of the authors' trax code (not in the paper).

    A learned table of max_seq_len x d_model would be 64K x 1024 = 67M parameters for enwik8.
    Instead position p = i * cols + j gets [E1_i ; E2_j]: rows x d1 plus cols x d2 parameters,
    with d1 + d2 = d_model (concatenated, as in the authors' trax AxialPositionalEncoding).
    """

    def __init__(self, d_model, shape):
        super().__init__()
        rows, cols = shape
        d1 = d_model // 2
        self.rows, self.cols = rows, cols
        self.e1 = nn.Parameter(torch.randn(rows, 1, d1) * 0.02)              # (rows, 1, d1)
        self.e2 = nn.Parameter(torch.randn(1, cols, d_model - d1) * 0.02)    # (1, cols, d2)

    def forward(self, T):
        p = torch.arange(T, device=self.e1.device)
        rows, cols = self.e1[p // self.cols, 0], self.e2[0, p % self.cols]  # (T, d1), (T, d2)
        return torch.cat([rows, cols], dim=-1)                               # (T, C)


class SinusoidalPositionalEmbedding(nn.Module):
    """Fixed sin/cos embedding of Vaswani et al.: PE(p, 2i) = sin(p / 10000^(2i/C)), cos for 2i+1."""

    def __init__(self, d_model, max_seq_len):
        super().__init__()
        pos = torch.arange(max_seq_len).unsqueeze(1)                         # (T, 1)
        freq = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_seq_len, d_model)
        pe[:, 0::2] = torch.sin(pos * freq)
        pe[:, 1::2] = torch.cos(pos * freq)[:, : d_model // 2]
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, T):
        return self.pe[:T]                                                   # (T, C)


class AbsolutePositionalEmbedding(nn.Module):
    """A learned table, one vector per position."""

    def __init__(self, d_model, max_seq_len):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, d_model)

    def forward(self, T):
        return self.emb.weight[:T]                                           # (T, C)


def positional_embedding(cfg):
    """The embedding cfg.pos_emb names, covering cfg.max_seq_len positions: forward(T) -> (T, C)."""
    if cfg.pos_emb == "axial":
        return AxialPositionalEmbedding(cfg.d_model, cfg.axial_dims())
    if cfg.pos_emb == "absolute":
        return AbsolutePositionalEmbedding(cfg.d_model, cfg.max_seq_len)
    return SinusoidalPositionalEmbedding(cfg.d_model, cfg.max_seq_len)


def token_scale(cfg):
    """The factor on token embeddings: sqrt(d_model) with sinusoidal positions, else 1.

    The sinusoids have magnitude ~0.7 per channel and our token embeddings start at std 0.02, so
    unscaled tokens would be drowned by their positions; Vaswani et al. (Section 3.4) multiply
    the embeddings by sqrt(d_model) for the same reason. Learned positions start at std 0.02
    like the tokens, so they need no factor."""
    return math.sqrt(cfg.d_model) if cfg.pos_emb == "sinusoidal" else 1.0


# -----------------------------------------------------------------------------------------------
# The two sub-layers, pre-LayerNorm
# -----------------------------------------------------------------------------------------------

class AttentionSublayer(nn.Module):
    """F(x) = dropout(Attention(LayerNorm(x))). Causal in the LM, not in the encoder of
    translation/encdec.py."""

    def __init__(self, cfg, kind, causal=True):
        super().__init__()
        self.ln = nn.LayerNorm(cfg.d_model)
        self.attn = LSHSelfAttention(cfg.d_model, cfg.n_heads, bucket_size=cfg.bucket_size,
                                     n_hashes=cfg.n_hashes, causal=causal, attn=kind,
                                     shared_qk=cfg.shared_qk, dropout=cfg.rate("attn_dropout"),
                                     dedup=cfg.dedup, impl=cfg.impl)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, padding_mask=None):
        return self.drop(self.attn(self.ln(x), padding_mask=padding_mask))


class FeedForwardSublayer(nn.Module):
    """G(x) = FeedForward(LayerNorm(x)), computed in ff_chunks pieces along T."""

    def __init__(self, cfg):
        super().__init__()
        self.ln = nn.LayerNorm(cfg.d_model)
        self.ff = ChunkedFeedForward(cfg.d_model, cfg.d_ff, n_chunks=cfg.ff_chunks,
                                     dropout=cfg.dropout, hidden_dropout=cfg.rate("relu_dropout"))

    def forward(self, x):
        return self.ff(self.ln(x))


class ResidualLayer(nn.Module):
    """The ordinary (non-reversible) Transformer layer: x + F(x), then + G(.). F gets the keyword
    arguments (a padding mask; in translation/encdec.py's decoder also the encoder output)."""

    def __init__(self, f, g):
        super().__init__()
        self.f, self.g = f, g

    def forward(self, x, **kwargs):
        x = x + self.f(x, **kwargs)
        return x + self.g(x)


def build_stack(pairs, reversible):
    """The layers of (F, G) pairs: reversible blocks (Section 3) or ordinary residual layers. The
    LM and the encoder-decoder both build their stacks here."""
    if reversible:
        return ReversibleSequence([ReversibleBlock(f, g) for f, g in pairs])
    return nn.ModuleList([ResidualLayer(f, g) for f, g in pairs])


def run_layers(layers, x, reversible, join="mean", **kwargs):
    """x (B, T, C) through a stack of build_stack; the keyword arguments go to every F. Returns
    (B, T, C), or (B, T, 2C) for reversible layers joined by concat."""
    if not reversible:
        for layer in layers:
            x = layer(x, **kwargs)
        return x
    # Two streams, both starting as the embedding (the authors duplicate the input).
    y1, y2 = layers(x, x, **kwargs)
    # Join them. The mean keeps width C, so the output layer can stay tied to the (V, C)
    # embedding; since y2 = x2 + G(y1) and y1 = x1 + F(x2), it carries both sub-layers' work.
    # trax's encoder-decoder averages too. trax's ReformerLM instead concatenates, keeping both
    # streams apart for a wider, untied output layer.
    if join == "concat":
        return torch.cat([y1, y2], dim=-1)                               # (B, T, 2C)
    return 0.5 * (y1 + y2)                                               # (B, T, C)


def logits_and_loss(h, head, targets, ff_chunks, label_smoothing=0.0):
    """Output layer and mean cross-entropy of the hidden states h (B, T, C); see forward()."""
    if targets is None:
        return head(h), None
    if ff_chunks > 1:
        n = min(ff_chunks, h.shape[0] * h.shape[1])
        return None, chunked_cross_entropy(h, head.weight, targets, n,
                                           label_smoothing=label_smoothing)
    logits = head(h)                                                     # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                           label_smoothing=label_smoothing)
    return logits, loss


def check_token_ids(idx, vocab_size, max_seq_len, name="idx"):
    """ValueError unless idx is (B, T) with T <= max_seq_len and ids in [0, vocab_size)."""
    if idx.dim() != 2:
        raise ValueError(f"{name} must be (B, T) token ids, got shape {tuple(idx.shape)}")
    T, V = idx.shape[1], vocab_size
    if T > max_seq_len:
        raise ValueError(f"{name}: sequence length T={T} exceeds max_seq_len={max_seq_len}; "
                         f"use T <= max_seq_len")
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= V:
        raise ValueError(f"{name}: token ids must be in [0, vocab_size={V}), got values in "
                         f"[{lo}, {hi}]")


# -----------------------------------------------------------------------------------------------
# The language model
# -----------------------------------------------------------------------------------------------

class ReformerLM(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = positional_embedding(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = build_stack([(AttentionSublayer(cfg, kind), FeedForwardSublayer(cfg))
                                   for kind in cfg.layer_attn()], cfg.reversible)
        width = 2 * cfg.d_model if cfg.rev_join == "concat" else cfg.d_model
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_weights:
            self.lm_head.weight = self.tok_emb.weight   # one (V, C) matrix, in and out

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def hidden_states(self, idx, padding_mask=None):
        """The final-LayerNorm output (B, T, C), or (B, T, 2C) with rev_join='concat', before the
        output layer."""
        check_token_ids(idx, self.config.vocab_size, self.config.max_seq_len)
        T = idx.shape[1]
        x = token_scale(self.config) * self.tok_emb(idx) + self.pos_emb(T)  # (B, T, C)
        x = self.drop(x)
        return self.ln_f(run_layers(self.layers, x, self.config.reversible, self.config.rev_join,
                                    padding_mask=padding_mask))

    def forward(self, idx, targets=None, padding_mask=None):
        """idx: (B, T) int64. targets: (B, T) with -100 for positions that do not count.

        Returns (logits (B, T, V), loss). With targets and ff_chunks > 1 the loss is computed
        chunk by chunk (chunked_ff.chunked_cross_entropy) and logits is None: the (B, T, V)
        tensor never exists. Without targets loss is None.
        """
        h = self.hidden_states(idx, padding_mask)                            # (B, T, C)
        return logits_and_loss(h, self.lm_head, targets, self.config.ff_chunks)

    def set_attention(self, attn=None, n_hashes=None):
        """Switch every layer's attention after training (paper Table 2: train with LSH-4,
        evaluate with full attention or LSH-8 on the same weights)."""
        self.config = switch_attention(self, self.config, attn, n_hashes)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Sample max_new_tokens tokens after idx (B, T). Each step reruns the whole forward over
        the last max_seq_len tokens: simple and exact, O(T) times more work than a cache of keys
        and values would need (LSH re-hashes the whole context anyway)."""
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.max_seq_len:]
            logits, _ = self(context)
            logits = logits[:, -1, :] / temperature                           # (B, V)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat([idx, next_id], dim=1)
        return idx

    def num_params(self):
        """Parameter count, each shared tensor once (tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu"):
        return model_from_checkpoint(cls, ModelConfig, path, map_location)

    def config_dict(self):
        return asdict(self.config)


def switch_attention(module, config, attn=None, n_hashes=None):
    """Set the attention kind and/or hash rounds of every LSHSelfAttention inside module; returns
    the config that describes it now. The config checks the values first (ModelConfig.validate),
    so a bad one changes nothing."""
    change = dict(attn=attn, attn_pattern="") if attn is not None else {}
    if n_hashes is not None:
        change["n_hashes"] = n_hashes
    config = replace(config, **change)
    for m in module.modules():
        if isinstance(m, LSHSelfAttention):
            m.attn = attn or m.attn
            m.n_hashes = config.n_hashes
    return config


def model_from_checkpoint(model_class, config_class, path, map_location="cpu"):
    """Rebuild a model from a train.py checkpoint: {'model_args': ..., 'model': state_dict}. The
    config takes the checkpoint's arguments that are its fields (the others are train.py's)."""
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    names = {f.name for f in fields(config_class)}
    model = model_class(config_class(**{k: v for k, v in ckpt["model_args"].items()
                                        if k in names}))
    model.load_state_dict(ckpt["model"])
    return model
