"""
The command line of train.py: one flag per ModelConfig field (the ablations of the paper, with the
field's help text), then the data, optimisation, evaluation and system flags, and the checks that
turn a bad value or combination into an argparse error naming it.

    args = parse_args(['--attn=full', '--n_hashes=8'])     # what `python train.py ...` sees
    config = model_config(args)                             # the ModelConfig of those flags
    python train.py --help                                  # every flag, grouped, with defaults
"""
import argparse
import dataclasses
import os
import shlex

from data import ByteTokenizer
from translation.encdec import EncDecConfig
from model import IMPLS, POS_EMBS, REV_JOINS, ModelConfig
from translation.translation_data import TRANSLATION_DATASETS

DESCRIPTION = ("Train a Reformer language model (Kitaev, Kaiser, Levskaya, ICLR 2020) on the "
               "duplication task of Table 2, on enwik8, or on any text file.")

# The default run, `python train.py`: ModelConfig's model on the duplication task, learnt on a
# 2-core CPU in a few minutes (README). The run's own defaults:
DEFAULT_RUN = dict(seq_len=64, batch_size=32, lr=6e-3, warmup=20, max_steps=800, eval_interval=100)

# Translation (translation/encdec.py): EncDecConfig's model, then these. A translation batch is
# --max_tokens padded tokens (B x max(S, T) summed over a step's batches), in length-bucketed
# batches of similar-length pairs; --batch_size (sequences) is the language model's. reverse: the
# synthetic task, small enough for a 2-core CPU in a few minutes (README); no dropout or smoothing
# (the task is noiseless); 544 = 32 strings of at most 17 tokens. parallel: a small corpus (~30K
# pairs) on a 2-core CPU in under an hour, EncDecConfig's 3 + 3 layers at d 256; the same recipe,
# written out with its reasons, is configs/parallel_small.args. wmt14: the authors'
# reformer_wmt_ende.gin schedule, Adam with 8K warmup and rsqrt decay (their 0.088 * rsqrt(8000)
# is --lr=9.8e-4), length 256, 128 x 256 padded tokens per step; the paper's model sizes are in
# configs/wmt14_*.args.
TRANSLATION_RUN = {
    'reverse': dict(vocab_size=20, n_layers=2, n_dec_layers=2, d_model=64, n_heads=4,
                    d_ff=128, dropout=0.0, label_smoothing=0.0, seq_len=17, max_tokens=544,
                    lr=3e-3, warmup=100, lr_schedule='cosine', max_steps=1500,
                    eval_interval=250, valid_size=500),
    'parallel': dict(seq_len=128, max_tokens=4096, lr=1.5e-3, warmup=60, lr_schedule='rsqrt',
                     max_steps=1200, eval_interval=200),
    'wmt14': dict(vocab_size=32000, seq_len=256, max_tokens=32768, lr=9.8e-4, warmup=8000,
                  lr_schedule='rsqrt', max_steps=100000, eval_interval=2000),
}
SMALL_CORPUS_ARGS = 'configs/parallel_small.args'   # TRANSLATION_RUN['parallel'], written out


def str2bool(s):
    """--flag=True / --flag=False (also 1/0, yes/no, any case); a bare --flag means True (const)."""
    if s.lower() in ('true', 't', 'yes', 'y', '1'):
        return True
    if s.lower() in ('false', 'f', 'no', 'n', '0'):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {s!r}")


def resume_flag(s):
    if s.lower() == 'auto':
        return 'auto'
    try:
        return str2bool(s)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected True, False or auto, got {s!r}") from None


def add_config_flags(group, config_class, defaults, skip=()):
    """One flag per field of the config dataclass (but those in skip): the same name, the
    field's help text."""
    for f in dataclasses.fields(config_class):
        if f.name in skip:
            continue
        if f.metadata.get("type"):   # a field whose default None means "as another flag"
            kw = dict(type=f.metadata["type"])
        elif type(f.default) is bool:
            kw = dict(type=str2bool, nargs='?', const=True)
        else:
            kw = dict(type=type(f.default), choices={'pos_emb': POS_EMBS, 'rev_join': REV_JOINS,
                                                     'impl': IMPLS}.get(f.name))
        group.add_argument(f'--{f.name}', default=defaults.get(f.name, f.default),
                           help=f.metadata['help'], **kw)


def build_parser():
    p = argparse.ArgumentParser(description=DESCRIPTION, fromfile_prefix_chars='@',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.convert_arg_line_to_args = lambda line: shlex.split(line, comments=True)  # '#' in @FILE
    boolean = dict(type=str2bool, nargs='?', const=True, default=False)
    g = p.add_argument_group('data')
    g.add_argument('--dataset', choices=['duplication', 'enwik8', 'text', *TRANSLATION_DATASETS],
                   default='duplication',
                   help='duplication: the synthetic task of Table 2; enwik8 or a text file: bytes; '
                        'translation (translation/): reverse (synthetic), parallel (--data_path='
                        f'FILE.tsv or SRC,TGT; its defaults: a small corpus on a 2-core CPU in '
                        f'under an hour, the recipe of @{SMALL_CORPUS_ARGS}), wmt14 (en-de, '
                        f'paper Table 4; @configs/wmt14_*.args)')
    g.add_argument('--data_dir', default='data', help='where enwik8.zip and the splits live')
    g.add_argument('--data_path', default=None, help='the file for --dataset=text')
    g.add_argument('--enwik8_split', choices=['byte', 't2t'], default='byte',
                   help="byte: 90M/5M/5M bytes; t2t: the paper's Tensor2Tensor split by characters")
    g.add_argument('--seq_len', type=int, default=DEFAULT_RUN['seq_len'],
                   help='tokens per sequence, T (translation: the longest sentence; longer '
                        'training pairs are skipped, held-out ones truncated)')
    g.add_argument('--tokenizer', choices=['sentencepiece', 'bytes'], default='sentencepiece',
                   help='translation: a sentencepiece vocabulary of --vocab_size trained on the '
                        'training text (cached in --data_dir), or bytes (259 ids)')
    g.add_argument('--heldout', type=int, default=1000,
                   help='--dataset=parallel: pairs split off at random for valid and for test')
    g = p.add_argument_group('model (flag = ModelConfig field; each one is an ablation)')
    # vocab_size and max_seq_len: None here, set by parse_args from --dataset and --seq_len
    add_config_flags(g, ModelConfig, dict(vocab_size=None, max_seq_len=None))
    g = p.add_argument_group('translation model (flag = EncDecConfig field; the rest as above)')
    add_config_flags(g, EncDecConfig, {}, skip={f.name for f in dataclasses.fields(ModelConfig)})
    g = p.add_argument_group('optimisation')
    g.add_argument('--batch_size', type=int, default=DEFAULT_RUN['batch_size'],
                   help='language model: the global batch, sequences per optimizer step, all '
                        'ranks and micro-steps (translation counts tokens: --max_tokens)')
    g.add_argument('--max_tokens', type=int, default=None,
                   help='translation: the global batch, padded tokens per optimizer step (B x '
                        'max(S, T) of each length-bucketed batch, all ranks and micro-steps)')
    g.add_argument('--grad_accum', type=int, default=1,
                   help='micro-steps per optimizer step on each rank (less memory, same batch)')
    g.add_argument('--optimizer', choices=['adam', 'adafactor'], default='adam',
                   help="adam (betas 0.9, 0.98: the authors' enwik8) or adafactor (the paper's)")
    g.add_argument('--lr', type=float, default=DEFAULT_RUN['lr'], help='peak learning rate')
    g.add_argument('--warmup', type=int, default=DEFAULT_RUN['warmup'],
                   help='steps of linear warmup')
    g.add_argument('--lr_schedule', choices=['constant', 'cosine', 'rsqrt'], default='constant',
                   help="after warmup: constant, cosine to lr/10 at --max_steps, or the authors' "
                        "rsqrt")
    g.add_argument('--clip', type=float, default=1.0, help='clip the gradient norm (0: do not)')
    g.add_argument('--max_steps', type=int, default=DEFAULT_RUN['max_steps'],
                   help='optimizer steps in all')
    g.add_argument('--seed', type=int, default=0, help='seeds data, initialisation, dropout, LSH')
    g = p.add_argument_group('evaluation')
    g.add_argument('--eval_interval', type=int, default=DEFAULT_RUN['eval_interval'],
                   help='evaluate and save a checkpoint every this many steps, and at the end')
    g.add_argument('--eval_iters', type=int, default=20,
                   help='enwik8/text: validation batches per eval (--eval_only: the whole split; '
                        'a translation corpus is always scored whole)')
    g.add_argument('--valid_size', type=int, default=256,
                   help='duplication: sequences in the fixed validation set')
    g.add_argument('--average_last', type=int, default=0,
                   help='keep the weights of the last N evals (ckpt_eval_STEP.pt) and write their '
                        'parameter mean, ckpt_avg.pt, at the end (0: neither)')
    g.add_argument('--eval_only', **boolean,
                   help='evaluate the checkpoint in --out_dir on the whole split, then exit')
    g.add_argument('--eval_split', choices=['valid', 'test'], default='valid',
                   help='--eval_only: which split')
    g.add_argument('--eval_checkpoint', choices=['last', 'best', 'avg'], default='last',
                   help='--eval_only: which weights: ckpt.pt (last), ckpt_best.pt (the lowest '
                        'validation NLL) or ckpt_avg.pt (--average_last)')
    g.add_argument('--eval_attn', default=None,
                   help='--eval_only: evaluate with this attention, not the trained one (Table 2)')
    g.add_argument('--eval_n_hashes', type=int, default=None,
                   help='--eval_only: evaluate with this many hash rounds (Table 2, Figure 4)')
    g = p.add_argument_group('system')
    g.add_argument('--device', default=None, help='cpu, cuda, cuda:1, mps; None: cuda if available')
    g.add_argument('--precision', choices=['fp32', 'bf16', 'fp16'], default='fp32',
                   help='autocast dtype of the forward pass; fp16 adds a GradScaler')
    g.add_argument('--compile', help='torch.compile the model', **boolean)
    g.add_argument('--out_dir', default='out',
                   help='ckpt.pt (the last step), ckpt_best.pt (the lowest validation NLL), '
                        'log.jsonl and loss.png go here')
    g.add_argument('--resume', type=resume_flag, nargs='?', const=True, default=False,
                   help="continue exactly from out_dir/ckpt.pt; auto: continue it if it exists, "
                        "else start afresh (torchrun --max_restarts, SLURM --requeue)")
    g.add_argument('--log_interval', type=int, default=10,
                   help='write the training loss to log.jsonl every this many steps')
    g.add_argument('--wandb', help='also log to Weights & Biases (project "reformer")', **boolean)
    return p


def parse_args(argv=None):
    """Parse and check the flags; a bad value or combination is an argparse error naming it."""
    p = build_parser()
    dataset = p.parse_known_args(argv)[0].dataset
    translation = dataset in TRANSLATION_DATASETS
    if translation:   # other defaults: EncDecConfig's, then the task's; no sequence batch
        p.set_defaults(**{**{f.name: f.default for f in dataclasses.fields(EncDecConfig)},
                          'max_seq_len': None, 'batch_size': None, **TRANSLATION_RUN[dataset]})
    a = p.parse_args(argv)
    check_batch_unit(p, a, translation)
    for name in ('seq_len', 'grad_accum', 'max_steps', 'eval_interval', 'eval_iters',
                 'valid_size', 'log_interval', 'max_tokens' if translation else 'batch_size'):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(a, name)}")
    if a.lr <= 0 or a.warmup < 0 or a.clip < 0 or a.average_last < 0:
        p.error(f"need --lr > 0, --warmup >= 0, --clip >= 0 and --average_last >= 0, got "
                f"{a.lr}, {a.warmup}, {a.clip}, {a.average_last}")
    world = int(os.environ.get('WORLD_SIZE', 1))
    flag, batch = '--max_tokens' if translation else '--batch_size', step_batch(a)
    if batch % (world * a.grad_accum):
        p.error(f"{flag}={batch} must be divisible by world_size x --grad_accum = "
                f"{world} x {a.grad_accum}, so that every micro-batch has the same size")
    if translation:
        check_translation(p, a)
    elif a.dataset == 'duplication':
        a.vocab_size = a.vocab_size or ModelConfig.vocab_size
        if a.seq_len < 4 or a.seq_len % 2:
            p.error(f"--dataset=duplication needs an even --seq_len >= 4 ('0 w 0 w'), "
                    f"got {a.seq_len}")
        if a.eval_split == 'test':
            p.error("--eval_split=test: the duplication task has one fixed validation set")
    else:
        if a.vocab_size not in (None, ByteTokenizer.vocab_size):
            p.error(f"--dataset={a.dataset} is byte-level: --vocab_size must be "
                    f"{ByteTokenizer.vocab_size} (or left out), got {a.vocab_size}")
        a.vocab_size = ByteTokenizer.vocab_size
        if a.dataset == 'text' and not a.data_path:
            p.error("--dataset=text needs --data_path=FILE")
    a.max_seq_len = a.max_seq_len or a.seq_len
    if a.max_seq_len < a.seq_len:
        p.error(f"--max_seq_len={a.max_seq_len} is shorter than --seq_len={a.seq_len}")
    if a.eval_checkpoint != 'last' and not a.eval_only:
        p.error(f"--eval_checkpoint={a.eval_checkpoint} chooses the weights --eval_only scores: "
                f"add --eval_only")
    if (a.eval_attn or a.eval_n_hashes is not None) and not a.eval_only:
        p.error("--eval_attn and --eval_n_hashes change a trained checkpoint: add --eval_only")
    try:   # a config checks itself when made (ModelConfig.validate): the one home of the checks
        dataclasses.replace(model_config(a), attn=a.eval_attn or a.attn, attn_pattern='',
                            n_hashes=a.eval_n_hashes or a.n_hashes)
    except ValueError as e:
        p.error(str(e))
    return a


def check_batch_unit(p, a, translation):
    """A language model's batch is --batch_size sequences; a translation batch is --max_tokens
    padded tokens (sentences vary in length, so a count of sentences says little). Each flag
    given to the other family is an error that names the right one."""
    if translation and a.batch_size is not None:
        p.error(f"--batch_size={a.batch_size} counts sequences, a language model's batch; a "
                f"translation batch is counted in tokens: give --max_tokens, the padded tokens "
                f"per step (--max_tokens={a.batch_size * a.seq_len} is {a.batch_size} pairs of "
                f"--seq_len={a.seq_len} at most)")
    if not translation and a.max_tokens is not None:
        p.error(f"--max_tokens={a.max_tokens} counts a translation batch in tokens; "
                f"--dataset={a.dataset} trains a language model, whose batch is --batch_size "
                f"sequences of --seq_len tokens")


def step_batch(args):
    """The global batch of one optimizer step, in the family's unit: --max_tokens padded tokens
    for translation, --batch_size sequences for a language model."""
    return args.batch_size if args.max_tokens is None else args.max_tokens


def check_translation(p, a):
    world = int(os.environ.get('WORLD_SIZE', 1))
    micro = a.max_tokens // (world * a.grad_accum)
    if micro < a.seq_len:
        p.error(f"--max_tokens={a.max_tokens} gives micro-batches of {micro} tokens (world_size "
                f"{world} x --grad_accum {a.grad_accum}), fewer than one pair of --seq_len="
                f"{a.seq_len}; raise --max_tokens to at least {world * a.grad_accum * a.seq_len}")
    if a.dataset == 'reverse':
        if a.seq_len < 5:
            p.error(f"--dataset=reverse needs --seq_len >= 5 (strings of 4 .. seq_len - 1 "
                    f"symbols, then EOS), got {a.seq_len}")
        if a.eval_split == 'test':
            p.error("--eval_split=test: the reverse task has one held-out set")
    if a.dataset == 'parallel' and not a.data_path:
        p.error("--dataset=parallel needs --data_path=FILE.tsv (source<TAB>target lines) or "
                "--data_path=SRC,TGT (two line-aligned files)")


def model_config(args):
    """The model's config from the flags: EncDecConfig for translation, else ModelConfig."""
    cls = EncDecConfig if args.dataset in TRANSLATION_DATASETS else ModelConfig
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
