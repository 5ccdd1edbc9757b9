"""
The reversible encoder-decoder Reformer (encdec.py) against a plain torch.nn.Transformer
encoder-decoder of the same size, trained for the same wall-clock time in the same run on a real
parallel corpus, then both scored with sacreBLEU on its held-out test part (beam search, the
same decoding code for both).

    apt-get install trans-de-en        # or: apt-get download trans-de-en && dpkg-deb -x ... ding
    python -m translation.translation_data --dataset=ding --data_dir=data          # -> data/ding_en_de.tsv
    OMP_NUM_THREADS=1 python -m translation.compare_translation --data_path=data/ding_en_de.tsv --budget_s=600

Fair time. The two models take turns: each iteration trains whichever has used less of its
budget, so a busy moment on a shared machine slows both alike, and each stops after budget_s
seconds of its own training steps (evaluation is not counted). Same data, batches, tokenizer,
optimizer (Adam 0.9/0.98, linear warmup then rsqrt decay, as the authors' configs), label
smoothing, dropout, tied embeddings and sizes. The baseline is nn.Transformer(norm_first=True,
activation='gelu'): pre-LayerNorm like ours. Results go to --out (experiments/results/translation.json).

Shape legend: B batch, S source length, T target length, C d_model, V vocab_size.
"""
import argparse
import json
import os
import platform
import sys
import time
import warnings

import torch
import torch.nn as nn

from translation.encdec import EncDecConfig, ReformerEncDec, token_scale
from model import ReformerLM, logits_and_loss, positional_embedding
from translation.translate import evaluate
from translation.translation_data import (ParallelStream, build_tokenizer, collate, encode_splits,
                              length_batches, load_parallel)


class TorchTransformerMT(nn.Module):
    """torch.nn.Transformer with our embeddings, output layer and loss, and the interface
    encdec.beam_search needs (encode, start_cache, step, reorder_cache). Its step reruns the
    decoder over the whole prefix: nn.Transformer has no key/value cache."""

    def __init__(self, config):
        super().__init__()
        self.config = cfg = config
        self.emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = positional_embedding(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        with warnings.catch_warnings():   # "nested tensors off with norm_first": as intended
            warnings.simplefilter("ignore", UserWarning)
            self.transformer = nn.Transformer(
                cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.n_dec_layers, cfg.d_ff,
                cfg.dropout, activation="gelu", batch_first=True, norm_first=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(ReformerLM._init_weights)
        self.lm_head.weight = self.emb.weight

    def _embed(self, idx):
        x = token_scale(self.config) * self.emb(idx) + self.pos_emb(idx.shape[1])
        return self.drop(x)                                                # (B, T, C)

    def encode(self, src):
        mask = src != 0
        return self.transformer.encoder(self._embed(src), src_key_padding_mask=~mask), mask

    def decode(self, tgt_in, memory, memory_mask):
        T = tgt_in.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=tgt_in.device).triu(1)
        return self.transformer.decoder(self._embed(tgt_in), memory, tgt_mask=causal,
                                        memory_key_padding_mask=~memory_mask)  # (B, T, C)

    def forward(self, src, tgt_in, targets=None):
        memory, mask = self.encode(src)
        return logits_and_loss(self.decode(tgt_in, memory, mask), self.lm_head, targets, 1,
                               self.config.label_smoothing)

    def start_cache(self, memory, memory_mask, max_len, repeat=1):
        return {"memory": memory.repeat_interleave(repeat, 0),
                "mask": memory_mask.repeat_interleave(repeat, 0),
                "tokens": memory.new_zeros((memory.shape[0] * repeat, 0), dtype=torch.long)}

    def step(self, token, t, cache):
        cache["tokens"] = torch.cat([cache["tokens"], token[:, None]], dim=1)
        h = self.decode(cache["tokens"], cache["memory"], cache["mask"])[:, -1]
        return self.lm_head(h)                                             # (B, V)

    @staticmethod
    def reorder_cache(cache, rows, n):
        """Row i becomes row rows[i] (encdec.ReformerEncDec.reorder_cache); n is not needed."""
        for name in ("tokens", "memory", "mask"):
            cache[name] = cache[name][rows]

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


def lr_at(step, peak, warmup):
    """Linear warmup to peak, then decay with 1 / sqrt(step) (Vaswani et al.; trax's rsqrt)."""
    step = max(step, 1)
    return peak * min(step / warmup, (warmup / step) ** 0.5)


@torch.no_grad()
def mean_loss(model, examples, max_tokens):
    """Label-smoothed loss per target token over a held-out split, in eval mode."""
    model.eval()
    total = count = 0.0
    for batch in length_batches(examples, max_tokens):
        src, tgt_in, targets = collate([examples[i] for i in batch])
        n = int((targets != -100).sum())
        total += float(model(src, tgt_in, targets)[1]) * n
        count += n
    model.train()
    return total / count


def train_side_by_side(models, data, a):
    """Train every model for a.budget_s seconds of its own steps, taking turns. Returns logs."""
    opts = {k: torch.optim.Adam(m.parameters(), lr=a.lr, betas=(0.9, 0.98), eps=1e-9)
            for k, m in models.items()}
    streams = {k: ParallelStream(data, a.max_seq_len, seed=a.seed) for k in models}  # same batches
    used = {k: 0.0 for k in models}
    steps = {k: 0 for k in models}
    log = {k: [] for k in models}
    while True:
        live = [k for k in models if used[k] < a.budget_s]
        if not live:
            return steps, used, log
        k = min(live, key=lambda name: used[name])
        model, opt = models[k], opts[k]
        t0 = time.perf_counter()
        src, tgt_in, targets = streams[k].batch(a.max_tokens // a.max_seq_len)
        for group in opt.param_groups:
            group["lr"] = lr_at(steps[k] + 1, a.lr, a.warmup)
        loss = model(src, tgt_in, targets)[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        used[k] += time.perf_counter() - t0
        steps[k] += 1
        if steps[k] % a.log_interval == 0:
            log[k].append({"step": steps[k], "seconds": round(used[k], 1), "loss": loss.item()})
            print(f"{k:12s} step {steps[k]:5d}  {used[k]:6.0f} s  loss {loss.item():.3f}",
                  flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--data_path", default="data/ding_en_de.tsv", help="TSV source<TAB>target")
    p.add_argument("--data_dir", default="data", help="where the tokenizer is cached")
    p.add_argument("--budget_s", type=float, default=600, help="training seconds per model")
    p.add_argument("--heldout", type=int, default=1000, help="valid and test pairs each")
    p.add_argument("--vocab_size", type=int, default=8000, help="sentencepiece vocabulary")
    p.add_argument("--max_seq_len", type=int, default=64)
    p.add_argument("--layers", type=int, default=3, help="encoder and decoder layers each")
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--n_heads", type=int, default=4)
    p.add_argument("--d_ff", type=int, default=1024)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--max_tokens", type=int, default=1024,
                   help="padded tokens per batch (rounded down to a multiple of max_seq_len)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=400)
    p.add_argument("--beam_size", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.6)
    p.add_argument("--log_interval", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="experiments/results/translation.json")
    a = p.parse_args(argv)
    splits, name = load_parallel("parallel", a.data_dir, a.data_path, a.heldout, a.seed)
    tok = build_tokenizer("sentencepiece", splits["train"], a.data_dir, name, a.vocab_size)
    data = encode_splits(splits, tok, a.max_seq_len)
    print(f"{len(data['train']):,} training pairs, {len(data['test']):,} test; vocab "
          f"{tok.vocab_size}; {torch.get_num_threads()} threads")
    cfg = EncDecConfig(vocab_size=tok.vocab_size, max_seq_len=a.max_seq_len,
                       n_layers=a.layers, n_dec_layers=a.layers, d_model=a.d_model,
                       n_heads=a.n_heads, d_ff=a.d_ff, dropout=a.dropout)
    torch.manual_seed(a.seed)
    models = {"reformer": ReformerEncDec(cfg), "transformer": TorchTransformerMT(cfg)}
    for k, m in models.items():
        print(f"{k}: {m.num_params():,} parameters")
    t0 = time.time()
    steps, used, log = train_side_by_side(models, data["train"], a)
    results = {"command": " ".join(["python -m translation.compare_translation"] + (sys.argv[1:] if argv is None
                                                                       else argv)),
               "args": vars(a), "config": cfg.__dict__, "n_train": len(data["train"]),
               "n_test": len(data["test"]), "vocab_size": tok.vocab_size,
               "machine": {"cpu": platform.processor() or platform.machine(),
                           "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                           "torch": torch.__version__, "load_avg": os.getloadavg()},
               "wall_s": time.time() - t0, "models": {}}
    for k, m in models.items():
        r = evaluate(m, tok, splits["test"], a.beam_size, a.alpha, device="cpu")
        r.update(params=m.num_params(), steps=steps[k], train_seconds=used[k],
                 valid_loss=mean_loss(m, data["valid"], a.max_tokens), log=log[k])
        results["models"][k] = r
        print(f"\n== {k}: {steps[k]} steps in {used[k]:.0f} s")
        print(f"sacreBLEU {r['bleu']:.2f}  chrF {r['chrf']:.2f}  valid loss "
              f"{r['valid_loss']:.3f}  teacher-forced acc "
              f"{100 * r['teacher_forced_token_accuracy']:.1f}%  ({r['bleu_signature']})")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".part", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(a.out + ".part", a.out)
    return results


if __name__ == "__main__":
    main()
