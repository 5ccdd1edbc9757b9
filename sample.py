"""
Sample from a model that train.py trained: text for the byte models (enwik8, a text file), symbol
ids for the duplication task, where it also shows the copy the model made, right or wrong.

    python sample.py --out_dir=out                                 # the default run's checkpoint
    python sample.py --out_dir=out --start="3 1 4 1 5"             # duplication: copy this w
    python sample.py --out_dir=out-text --start="ROMEO:" --num_samples=3 --temperature=0.8
    python sample.py --out_dir=out-text --start=FILE:prompt.txt --top_k=40
    python sample.py --out_dir=out --attn=full                     # other attention, same weights

Every draw (the sampled tokens and the LSH rotations) comes from --seed: the same flags print the
same samples. Generation reruns the model over the last max_seq_len tokens for each new token.
"""
import argparse

import torch

from checkpoint import load_checkpoint
from data import ByteTokenizer, DuplicationTask
from model import ModelConfig, ReformerLM

p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
p.add_argument('--out_dir', default='out', help='the folder with ckpt.pt')
p.add_argument('--start', default=None, help="the prompt, or FILE:path to read it from a file; "
               "duplication: symbol ids of w, e.g. '3 1 4' (default: drawn from --seed); "
               "bytes: text (default: a newline)")
p.add_argument('--num_samples', type=int, default=2, help='how many samples to draw')
p.add_argument('--max_new_tokens', type=int, default=None,
               help='tokens to generate (default: |w| for duplication, 500 for bytes)')
p.add_argument('--temperature', type=float, default=1.0, help='< 1 sharper, > 1 more random')
p.add_argument('--top_k', type=int, default=None, help='sample only from the k likeliest tokens')
p.add_argument('--seed', type=int, default=1337, help='seeds the samples and the LSH rotations')
p.add_argument('--attn', default=None, help='sample with this attention, not the trained one')
p.add_argument('--n_hashes', type=int, default=None, help='sample with this many hash rounds')
p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
               help='cpu, cuda, mps')


def main(argv=None):
    args = p.parse_args(argv)
    ckpt = load_checkpoint(f'{args.out_dir}/ckpt.pt', '--out_dir')
    model = ReformerLM(ModelConfig(**ckpt['model_args']))
    model.load_state_dict(ckpt['model'])
    try:
        model.set_attention(attn=args.attn, n_hashes=args.n_hashes)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    model.to(args.device).eval()
    T, dataset = model.config.max_seq_len, ckpt['args']['dataset']
    start = args.start
    if start and start.startswith('FILE:'):
        with open(start[5:], encoding='utf-8') as f:
            start = f.read()
    torch.manual_seed(args.seed)
    if dataset == 'duplication':
        return sample_duplication(model, start, ckpt['args']['seq_len'], args)
    idx = torch.tensor([ByteTokenizer().encode(start or '\n')], device=args.device)   # (1, T0)
    if idx.shape[1] > T:
        print(f"note: --start has {idx.shape[1]} tokens, more than max_seq_len={T}: the model "
              f"sees only the last {T}, as generate() does")
    texts = []
    for _ in range(args.num_samples):
        out = model.generate(idx, args.max_new_tokens or 500, args.temperature, args.top_k)
        texts.append(ByteTokenizer().decode(out[0]))
        print(texts[-1], '\n' + '-' * 40)
    return texts


def sample_duplication(model, start, seq_len, args):
    """The prompt is '0 w 0'; the model should continue with w. Prints w, the copy, the errors."""
    V = model.config.vocab_size
    if start:
        try:
            w = torch.tensor([[int(s) for s in start.replace(',', ' ').split()]])    # (1, |w|)
        except ValueError:
            raise SystemExit(f"error: --start={start!r}: the duplication task takes symbol ids, "
                             f"e.g. '3 1 4'") from None
        if w.numel() == 0 or not ((1 <= w) & (w < V)).all():
            raise SystemExit(f"error: --start={start!r}: need symbols in 1..{V - 1}")
        ws = w.expand(args.num_samples, -1)                                          # (N, |w|)
    else:   # a fresh w of the trained length per sample, |w| = seq_len/2 - 1
        x, _ = DuplicationTask(V, seq_len, args.seed).valid_set(args.num_samples)  # (N, T)
        ws = x[:, 1:seq_len // 2]
    if 2 * ws.shape[1] + 2 > model.config.max_seq_len:
        print(f"note: '0 w 0 w' has {2 * ws.shape[1] + 2} tokens, more than max_seq_len="
              f"{model.config.max_seq_len}: the model sees only the last ones, as generate() does")
    zero = torch.zeros(1, 1, dtype=torch.long)
    copies = []
    for w in ws.tolist():
        prompt = torch.cat([zero, torch.tensor([w]), zero], dim=1).to(args.device)  # (1, |w|+2)
        copy = model.generate(prompt, args.max_new_tokens or len(w), args.temperature,
                              args.top_k)[0, prompt.shape[1]:].tolist()
        wrong = [a != b for a, b in zip(copy, w)]
        print('w:    ', ' '.join(map(str, w)))
        print('copy: ', ' '.join(map(str, copy)))
        if any(wrong):   # a caret under every symbol copied wrong
            print('wrong:', ' '.join(('^' if bad else ' ') * len(str(a))
                                     for a, bad in zip(copy, wrong)).rstrip())
        print(f"{len(w) - sum(wrong)}/{len(w)} symbols copied right\n" + '-' * 40)
        copies.append(copy)
    return copies


if __name__ == '__main__':
    main()
