"""
Translate with a trained encoder-decoder Reformer (encdec.py), and score translations the way the
paper's Table 4 does: decode with beam search, detokenise, and compare with sacreBLEU against the
raw (untokenised) references.

    python -m translation.translate --out_dir=out-wmt14 --input=news.en > news.de   # a line each
    echo "The house is very old." | python -m translation.translate --out_dir=out-ding   # stdin
    python -m translation.translate --out_dir=out-wmt14 --eval             # sacreBLEU, test set
    python -m translation.translate --out_dir=out-wmt14 --eval --split=valid --beam_size=1

--eval prints sacreBLEU's signature, BLEU and chrF of the beam-search translations of the
held-out split, and the teacher-forced token accuracy (argmax of the next token given the true
prefix, labelled as such): the number the fastai reproduction (ML Reproducibility Challenge 2020)
reported as "BLEU", which is not a translation and not comparable with published BLEU.

Which weights: --checkpoint=best (the default: DIR/ckpt_best.pt, the eval with the lowest
validation NLL), last (DIR/ckpt.pt, the last step), avg (DIR/ckpt_avg.pt, train.py
--average_last) or a path; the file used is printed on stderr. A checkpoint (written by train.py
--dataset=parallel or wmt14) holds the model ('model_args', 'model'), the tokenizer (in 'data':
its kind and, for sentencepiece, the serialized model) and the training flags ('args': dataset,
data_dir, data_path, heldout, seed), from which --eval finds the test set.

    python -m translation.translate --out_dir=out-ding --eval --checkpoint=avg   # the averaged one
"""
import argparse
import json
import os
import sys
import time

import torch

from translation.encdec import ReformerEncDec, beam_search, greedy_decode
from translation.translation_data import (LOSSY_WARNING, collate, encode_pairs, encode_splits,
                                          length_batches, load_parallel, tokenizer_from_state)


def _import_sacrebleu():
    try:
        import sacrebleu
    except ImportError:
        raise ImportError("BLEU needs the sacrebleu package: pip install sacrebleu (see "
                          "requirements.txt)") from None
    return sacrebleu


CHECKPOINTS = {"best": "ckpt_best.pt", "last": "ckpt.pt", "avg": "ckpt_avg.pt"}


def checkpoint_path(out_dir, checkpoint="best"):
    """The file that --checkpoint names: best, last or avg in out_dir (CHECKPOINTS), or a path.
    A run without ckpt_best.pt (written before train.py kept one) gives ckpt.pt for best."""
    if checkpoint not in CHECKPOINTS:
        return checkpoint
    path = os.path.join(out_dir, CHECKPOINTS[checkpoint])
    last = os.path.join(out_dir, CHECKPOINTS["last"])
    if checkpoint == "best" and not os.path.exists(path) and os.path.exists(last):
        print(f"note: {out_dir} has no {CHECKPOINTS['best']}; using {last}, the last step",
              file=sys.stderr)
        return last
    return path


def load(out_dir, device="cpu", checkpoint="best"):
    """(model in eval mode, tokenizer, checkpoint dict) from the checkpoint that `checkpoint`
    names (checkpoint_path); says on stderr which file it is."""
    path = checkpoint_path(out_dir, checkpoint)
    if not os.path.exists(path):
        hint = ("train.py --average_last=N writes it" if path.endswith(CHECKPOINTS["avg"]) else
                f"train one with train.py --out_dir={out_dir}" if checkpoint in CHECKPOINTS else
                "--checkpoint is best, last, avg or the path of a checkpoint")
        raise FileNotFoundError(f"no checkpoint at {path}; {hint}")
    ckpt = torch.load(path, map_location=device, weights_only=False)
    tokenizer = (ckpt.get("data") or {}).get("tokenizer")   # train.py keeps it with the data
    if tokenizer is None:
        raise ValueError(f"{path} is not a checkpoint of a translation corpus (it has no "
                         f"tokenizer: a language model, or the reverse task? use train.py "
                         f"--eval_only for those)")
    model = ReformerEncDec.from_checkpoint(path, map_location=device).to(device).eval()
    print(f"using {path}: {describe_checkpoint(ckpt)}", file=sys.stderr)
    tokenizer = tokenizer_from_state(tokenizer)
    if tokenizer.kind == "sentencepiece" and not tokenizer.lossless():
        print(LOSSY_WARNING.format(where=path), file=sys.stderr)
    return model, tokenizer, ckpt


def describe_checkpoint(ckpt):
    """'step 1200, valid nll 2.41' (ckpt_best.pt, ckpt_eval_STEP.pt), 'the mean of steps [...]'
    (ckpt_avg.pt), or 'step N' (ckpt.pt, which holds no validation metrics)."""
    if "averaged_steps" in ckpt:
        return f"the parameter mean of steps {ckpt['averaged_steps']}"
    valid = ckpt.get("valid") or {}
    nll = f", valid nll {valid['nll']:.4f}" if "nll" in valid else ""
    return f"step {ckpt.get('step')}{nll}"


@torch.no_grad()
def translate_examples(model, examples, beam_size=4, alpha=0.6, max_tokens=4096, device="cpu",
                       min_len=1):
    """Decode tokenised examples [(src_ids, _)] in length-sorted batches of at most max_tokens
    source tokens, each hypothesis at least min_len tokens; returns the hypotheses' token ids
    in the input order."""
    out = [None] * len(examples)
    for batch in length_batches(examples, max_tokens):
        src = collate([examples[i] for i in batch], device)[0]             # (B, S)
        if beam_size == 1:
            hyps = greedy_decode(model, src, min_len=min_len)              # the same, faster
        else:
            hyps = beam_search(model, src, beam_size=beam_size, alpha=alpha, min_len=min_len)
        for i, h in zip(batch, hyps):
            out[i] = h
    return out


def translate(model, tokenizer, lines, beam_size=4, alpha=0.6, max_tokens=4096, device="cpu",
              min_len=1):
    """Translations of raw sentences (sources longer than max_seq_len are truncated)."""
    examples, _ = encode_pairs([(s, "") for s in lines], tokenizer, model.config.max_seq_len,
                               long="truncate")
    ids = translate_examples(model, examples, beam_size, alpha, max_tokens, device, min_len)
    return [tokenizer.decode(h) for h in ids]


def sacrebleu_scores(hypotheses, references):
    """sacreBLEU's corpus BLEU and chrF of detokenised hypotheses against raw references, with
    its default settings (13a tokenisation, mixed case: what the paper's 'sacreBLEU cased'
    column uses) and their signatures."""
    metrics = _import_sacrebleu().metrics
    bleu, chrf = metrics.BLEU(), metrics.CHRF()
    b = bleu.corpus_score(hypotheses, [references])
    c = chrf.corpus_score(hypotheses, [references])
    return {"bleu": b.score, "chrf": c.score, "bleu_detail": str(b),
            "bleu_signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature())}


@torch.no_grad()
def teacher_forced_accuracy(model, examples, max_tokens=4096, device="cpu"):
    """(correct, counted): argmax next-token predictions given the true target prefix, over
    the real target tokens (EOS included). Not a translation: no decoding happens."""
    model.eval()
    correct = count = 0
    for batch in length_batches(examples, max_tokens):
        src, tgt_in, targets = collate([examples[i] for i in batch], device)
        logits = model.lm_head(model.decode(tgt_in, *model.encode(src)))  # (B, T, V)
        mask = targets != -100
        correct += int(((logits.argmax(-1) == targets) & mask).sum())
        count += int(mask.sum())
    return correct, count


def exact_match(model, examples, beam_size=1, max_tokens=4096, device="cpu"):
    """Fraction of examples [(src_ids, tgt_ids)] whose decoded output equals the target exactly
    (the synthetic tasks' metric; greedy by default)."""
    hyps = translate_examples(model, examples, beam_size, 0.6, max_tokens, device)
    return sum(h == t[:-1].tolist() for h, (_, t) in zip(hyps, examples)) / len(examples)


def evaluate(model, tokenizer, pairs, beam_size=4, alpha=0.6, max_tokens=4096, device="cpu",
             min_len=1, hypotheses=False):
    """Translate the sources of raw pairs [(source, reference)], score with sacreBLEU against
    the raw references, and add the teacher-forced token accuracy. Returns a dict, with every
    detokenised output under 'hypotheses' if asked for."""
    examples = encode_splits({"eval": pairs}, tokenizer, model.config.max_seq_len)["eval"]
    t0 = time.time()
    ids = translate_examples(model, examples, beam_size, alpha, max_tokens, device, min_len)
    hyps = [tokenizer.decode(h) for h in ids]
    seconds = time.time() - t0
    result = sacrebleu_scores(hyps, [r for _, r in pairs])
    correct, count = teacher_forced_accuracy(model, examples, max_tokens, device)
    result.update(teacher_forced_token_accuracy=correct / count, n_sentences=len(pairs),
                  beam_size=beam_size, alpha=alpha, decode_seconds=seconds,
                  examples=[{"source": s, "reference": r, "hypothesis": h}
                            for (s, r), h in list(zip(pairs, hyps))[:5]])
    if hypotheses:
        result["hypotheses"] = hyps
    return result


def print_scores(result):
    print(f"sacreBLEU {result['bleu']:.2f}  ({result['bleu_detail']})")
    print(f"  signature: {result['bleu_signature']}")
    print(f"chrF {result['chrf']:.2f}  signature: {result['chrf_signature']}")
    print(f"teacher-forced token accuracy (not a translation metric): "
          f"{100 * result['teacher_forced_token_accuracy']:.2f}%")
    print(f"{result['n_sentences']:,} sentences, beam {result['beam_size']}, alpha "
          f"{result['alpha']}, decoded in {result['decode_seconds']:.1f} s")


# -----------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="Translate one sentence per line, or score a "
                                            "checkpoint with sacreBLEU (--eval).")
    p.add_argument("--out_dir", required=True, help="folder with train.py's checkpoints")
    p.add_argument("--checkpoint", default="best", help="best (ckpt_best.pt: lowest validation "
                   "NLL), last (ckpt.pt), avg (ckpt_avg.pt: --average_last) or a file path")
    p.add_argument("--input", default=None, help="file of source sentences (default: stdin)")
    p.add_argument("--eval", action="store_true", help="sacreBLEU + chrF on a held-out split")
    p.add_argument("--split", choices=("test", "valid"), default="test", help="for --eval")
    p.add_argument("--beam_size", type=int, default=4, help="beam width (Vaswani et al.: 4; "
                   "1 = greedy)")
    p.add_argument("--alpha", type=float, default=0.6, help="GNMT length penalty exponent")
    p.add_argument("--max_tokens", type=int, default=4096, help="source tokens per batch")
    p.add_argument("--min_len", type=int, default=1, help="the fewest tokens a translation "
                   "has (EOS is held back until then; 1: never empty)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    path = checkpoint_path(a.out_dir, a.checkpoint)
    model, tokenizer, ckpt = load(a.out_dir, a.device, path)
    opts = dict(beam_size=a.beam_size, alpha=a.alpha, max_tokens=a.max_tokens, device=a.device,
                min_len=a.min_len)
    if a.eval:
        args = ckpt["args"]
        splits, _ = load_parallel(args["dataset"], args["data_dir"], args.get("data_path"),
                                  args.get("heldout", 1000), args.get("seed", 0))
        result = evaluate(model, tokenizer, splits[a.split], **opts)
        print_scores(result)
        result.update(step=ckpt.get("step"), split=a.split,
                      checkpoint=path,
                      averaged_steps=ckpt.get("averaged_steps"))
        with open(os.path.join(a.out_dir, f"eval_{a.split}.json"), "w") as f:
            json.dump(result, f, indent=1)
        return result
    lines = (open(a.input, encoding="utf-8") if a.input else sys.stdin).read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for line in translate(model, tokenizer, lines, **opts):
        print(line)


if __name__ == "__main__":
    main()
