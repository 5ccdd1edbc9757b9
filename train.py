"""
Train a Reformer language model (Kitaev, Kaiser, Levskaya, "Reformer: The Efficient Transformer",
ICLR 2020) on the duplication task of Table 2, on enwik8, or on any text file.

One code path for a CPU, one GPU and many GPUs (torchrun sets RANK in the environment):

    python train.py          # the default run: an LSH Reformer learns the duplication task on a CPU
                             # (800 steps, ~70 s on 2 cores, 99.9% validation accuracy)
    python train.py @configs/duplication_lsh4.args                   # a paper experiment: one file
    python train.py @configs/duplication_lsh4.args --eval_only --eval_attn=full    # a Table 2 cell
    python train.py @configs/enwik8_ablation.args --eval_only --eval_split=test    # test bits/char
    torchrun --standalone --nproc_per_node=8 train.py @configs/enwik8_ablation.args   # 8 GPUs, nccl
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 train.py --device=cpu  # 2 CPU, gloo

Several nodes: see the README. All flags: python train.py --help. In an @FILE flags are separated by
spaces or newlines and '#' starts a comment; flags after it on the command line override it.

The global batch is --batch_size sequences, batch_size * seq_len tokens per optimizer step whatever
the number of processes: each of the world_size ranks runs --grad_accum micro-steps of
batch_size / (world_size * grad_accum) sequences. Rank 0 writes into --out_dir: ckpt.pt (model,
optimizer, scaler, step, RNG states, data position, config, args), log.jsonl (the training loss
every --log_interval steps and every eval) and, at the end, loss.png.
"""
import argparse
import dataclasses
import gc
import hashlib
import json
import math
import os
import random
import shlex
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import (IGNORE_INDEX, ByteStream, ByteTokenizer, DuplicationTask, bits_per_char,
                  masked_accuracy, prepare_dataset)
from lsh_attention import ATTN_KINDS
from model import POS_EMBS, ModelConfig, ReformerLM

# The default run, `python train.py`: an LSH Reformer small enough to learn the duplication task
# on a 2-core CPU in a few minutes (measured: README). Model fields not listed keep ModelConfig's
# defaults (the paper's Table 2 model). Why absolute positions: the copy sits T/2 - 1 positions
# back, and with axial positions (8 x 8 for T = 64) that offset wraps a row for 1 position in 8,
# which a row term plus a column term cannot express (1 layer stalled at 87%: every 8th position
# wrong). Why 2 layers: they left the chance plateau sooner and more reliably than 1; seeds 0-6
# all passed 98.5% by step 800.
DEFAULT_MODEL = dict(vocab_size=16, n_layers=2, d_model=64, n_heads=4, d_ff=128, n_hashes=4,
                     bucket_size=8, pos_emb='absolute')
DEFAULT_RUN = dict(seq_len=64, batch_size=32, lr=6e-3, warmup=20, max_steps=800, eval_interval=100)

# What each model flag ablates. The flag name is the ModelConfig field and the args attribute.
MODEL_HELP = {
    'vocab_size': f"vocabulary; None = {DEFAULT_MODEL['vocab_size']} for duplication (symbols "
                  f"0..V-1; Table 2: 128), {ByteTokenizer.vocab_size} (fixed) for enwik8/text",
    'max_seq_len': 'longest sequence the position embedding covers; None = --seq_len',
    'n_layers': 'layers (Table 2: 1; enwik8 ablations, Figures 3-5: 3; Section 5: 12)',
    'd_model': 'model width (Table 2: 256; enwik8 ablations: 1024)',
    'n_heads': 'attention heads (Table 2: 4; enwik8: 8)',
    'd_ff': 'feed-forward width (Table 2: 256; enwik8: 4096)',
    'dropout': 'dropout; the reversible backward replays its masks exactly (enwik8: 0.1-0.2)',
    'attn': 'attention: lsh (Section 2), full (the baseline of Table 2, Figure 5) or local',
    'attn_pattern': "per-layer attention cycled over the layers, e.g. local,local,lsh,local (the "
                    "authors' enwik8 model); '' = --attn everywhere",
    'shared_qk': 'shared queries and keys (Section 2, Figure 3 left); False: full/local only',
    'n_hashes': 'LSH hash rounds (Section 2, multi-round LSH; Table 2, Figure 4)',
    'bucket_size': 'LSH/local chunk length m: a query sees 2m keys per round (Section 2; 64)',
    'dedup': 'count a key that several hash rounds find only once (Section 2, multi-round LSH)',
    'impl': 'attention code: fast (lsh_attention.py Part 2) or reference (Part 1, plain PyTorch)',
    'reversible': 'reversible residual layers (Section 3, Figure 3 right); False: ordinary ones',
    'ff_chunks': 'feed-forward layer and output loss in chunks along T (Section 3; Table 3)',
    'pos_emb': "position embedding: axial (the authors', Section 5), absolute or sinusoidal",
    'axial_shape': "axial position factors, e.g. 32,32; '' derives them from max_seq_len",
    'tie_weights': 'share the input embedding matrix with the output layer',
}


# ----------------------------------------------------------------------------- command line

def str2bool(s):
    """--flag=True / --flag=False (also 1/0, yes/no, any case); a bare --flag means True (const)."""
    if s.lower() in ('true', 't', 'yes', 'y', '1'):
        return True
    if s.lower() in ('false', 'f', 'no', 'n', '0'):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {s!r}")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], fromfile_prefix_chars='@',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.convert_arg_line_to_args = lambda line: shlex.split(line, comments=True)  # '#' in @FILE
    boolean = dict(type=str2bool, nargs='?', const=True, default=False)
    # data
    g = p.add_argument_group('data')
    g.add_argument('--dataset', choices=['duplication', 'enwik8', 'text'], default='duplication',
                   help='duplication: the synthetic task of Table 2; enwik8 or a text file: bytes')
    g.add_argument('--data_dir', default='data', help='where enwik8.zip and the splits live')
    g.add_argument('--data_path', default=None, help='the file for --dataset=text')
    g.add_argument('--enwik8_split', choices=['byte', 't2t'], default='byte',
                   help="byte: 90M/5M/5M bytes; t2t: the paper's Tensor2Tensor split by characters")
    g.add_argument('--seq_len', type=int, default=DEFAULT_RUN['seq_len'],
                   help='tokens per sequence, T')
    # model: one flag per ModelConfig field, each one an ablation
    g = p.add_argument_group('model (flag = ModelConfig field; each one is an ablation)')
    for f in dataclasses.fields(ModelConfig):
        kw = dict(boolean) if type(f.default) is bool else dict(type=type(f.default))
        kw['default'] = DEFAULT_MODEL.get(f.name, f.default)
        if f.name in ('vocab_size', 'max_seq_len'):   # set by parse_args from --dataset, --seq_len
            kw['default'] = None
        kw['choices'] = {'attn': ATTN_KINDS, 'pos_emb': POS_EMBS}.get(f.name)
        g.add_argument(f'--{f.name}', help=MODEL_HELP.get(f.name, f'ModelConfig.{f.name}'), **kw)
    # optimisation
    g = p.add_argument_group('optimisation')
    g.add_argument('--batch_size', type=int, default=DEFAULT_RUN['batch_size'],
                   help='global batch: sequences per optimizer step, all ranks and micro-steps')
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
    # evaluation
    g = p.add_argument_group('evaluation')
    g.add_argument('--eval_interval', type=int, default=DEFAULT_RUN['eval_interval'],
                   help='evaluate and save a checkpoint every this many steps, and at the end')
    g.add_argument('--eval_iters', type=int, default=20,
                   help='enwik8/text: validation batches per eval (--eval_only: the whole split)')
    g.add_argument('--valid_size', type=int, default=256,
                   help='duplication: sequences in the fixed validation set')
    g.add_argument('--eval_only', **boolean,
                   help='evaluate the checkpoint in --out_dir on the whole split, then exit')
    g.add_argument('--eval_split', choices=['valid', 'test'], default='valid',
                   help='--eval_only: which split')
    g.add_argument('--eval_attn', choices=ATTN_KINDS, default=None,
                   help='--eval_only: evaluate with this attention, not the trained one (Table 2)')
    g.add_argument('--eval_n_hashes', type=int, default=None,
                   help='--eval_only: evaluate with this many hash rounds (Table 2, Figure 4)')
    # system
    g = p.add_argument_group('system')
    g.add_argument('--device', default=None, help='cpu, cuda, cuda:1, mps; None: cuda if available')
    g.add_argument('--precision', choices=['fp32', 'bf16', 'fp16'], default='fp32',
                   help='autocast dtype of the forward pass; fp16 adds a GradScaler')
    g.add_argument('--compile', help='torch.compile the model', **boolean)
    g.add_argument('--out_dir', default='out', help='ckpt.pt, log.jsonl and loss.png go here')
    g.add_argument('--resume', help='continue exactly from out_dir/ckpt.pt', **boolean)
    g.add_argument('--log_interval', type=int, default=10,
                   help='write the training loss to log.jsonl every this many steps')
    g.add_argument('--wandb', help='also log to Weights & Biases (project "reformer")', **boolean)
    return p


def parse_args(argv=None):
    """Parse and check the flags; a bad value or combination is an argparse error naming it."""
    p = build_parser()
    a = p.parse_args(argv)
    for name in ('seq_len', 'batch_size', 'grad_accum', 'max_steps', 'eval_interval', 'eval_iters',
                 'valid_size', 'log_interval'):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(a, name)}")
    if a.lr <= 0 or a.warmup < 0 or a.clip < 0:
        p.error(f"need --lr > 0, --warmup >= 0 and --clip >= 0, got {a.lr}, {a.warmup}, {a.clip}")
    world = int(os.environ.get('WORLD_SIZE', 1))
    if a.batch_size % (world * a.grad_accum):
        p.error(f"--batch_size={a.batch_size} must be divisible by world_size x --grad_accum = "
                f"{world} x {a.grad_accum}, so that every micro-batch has the same size")
    if a.dataset == 'duplication':
        a.vocab_size = a.vocab_size or DEFAULT_MODEL['vocab_size']
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
    if (a.eval_attn or a.eval_n_hashes is not None) and not a.eval_only:
        p.error("--eval_attn and --eval_n_hashes change a trained checkpoint: add --eval_only")
    if a.eval_n_hashes is not None and a.eval_n_hashes < 1:
        p.error(f"--eval_n_hashes must be >= 1, got {a.eval_n_hashes}")
    return a


# ----------------------------------------------------------------------------- set-up

def setup_distributed(device):
    """(ddp, rank, local_rank, world_size, device); torchrun sets RANK, LOCAL_RANK, WORLD_SIZE."""
    if device is None:
        device = ('cuda' if torch.cuda.is_available() else
                  'mps' if torch.backends.mps.is_available() else 'cpu')
    ddp = int(os.environ.get('RANK', -1)) != -1
    if not ddp:
        return False, 0, 0, 1, device
    rank, local_rank = int(os.environ['RANK']), int(os.environ['LOCAL_RANK'])
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    return True, rank, local_rank, dist.get_world_size(), device


def autocast_context(precision, device):
    """Autocast for the forward pass (nullcontext for fp32); backward runs outside it."""
    if precision == 'fp32':
        return nullcontext()
    if precision == 'bf16' and device.startswith('cuda') and not torch.cuda.is_bf16_supported():
        raise SystemExit("error: --precision=bf16: this GPU has no bfloat16; use fp16 or fp32")
    dtype = torch.bfloat16 if precision == 'bf16' else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def model_config(args):
    return ModelConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ModelConfig)})


def build_model(config, device):
    try:
        return ReformerLM(config).to(device)
    except ValueError as e:   # an impossible combination of model flags; the message says which
        raise SystemExit(f"error: {e}")


def make_optimizer(args, model):
    if args.optimizer == 'adam':   # the authors' enwik8 Adam: betas (0.9, 0.98), eps 1e-9
        return torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.98), eps=1e-9)
    if not hasattr(torch.optim, 'Adafactor'):
        raise SystemExit(f"error: --optimizer=adafactor needs torch >= 2.5, this is "
                         f"{torch.__version__}")
    return torch.optim.Adafactor(model.parameters(), lr=args.lr)


def get_lr(step, args):
    """Learning rate at optimizer step `step` (1-based): linear warmup, then the schedule.

    rsqrt is the authors' (trax) lr * min(1, step/warmup) * rsqrt(max(step, warmup)), rescaled so
    that the peak is --lr: their enwik8 0.03125 * rsqrt(2000) is --lr=7e-4 --warmup=2000.
    """
    warm = min(1.0, step / args.warmup) if args.warmup else 1.0
    if args.lr_schedule == 'rsqrt':
        return args.lr * warm * math.sqrt(max(args.warmup, 1) / max(step, args.warmup, 1))
    if args.lr_schedule == 'cosine':
        progress = min(1.0, max(0, step - args.warmup) / max(1, args.max_steps - args.warmup))
        return args.lr * warm * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))
    return args.lr * warm


def setup_data(args, rank, world, ddp):
    """(train stream, split paths). Byte data is prepared once, on rank 0, while the others wait."""
    if args.dataset == 'duplication':
        return DuplicationTask(args.vocab_size, args.seq_len, args.seed, rank, world), None
    prepare = lambda: prepare_dataset(args.dataset, args.data_dir, args.data_path,
                                      args.enwik8_split, args.seq_len)
    try:
        paths = prepare() if rank == 0 else None
        if ddp:
            dist.barrier()
        paths = paths or prepare()   # the other ranks find rank 0's finished files and return
        return ByteStream(paths['train'], args.seq_len, args.seed, rank, world), paths
    except (OSError, ValueError) as e:   # a missing file or no network: the message says the fix
        raise SystemExit(f"error: {e}")


# ----------------------------------------------------------------------------- evaluation

def eval_batches(args, paths, split, rank, world, micro, full):
    """This rank's share of the held-out data in batches of `micro` sequences: the duplication
    task's fixed validation set; or for bytes --eval_iters random batches (the same at every eval),
    or with full=True every window of the split (ByteStream.iter_eval)."""
    if args.dataset == 'duplication':
        x, y = DuplicationTask(args.vocab_size, args.seq_len, args.seed).valid_set(args.valid_size)
        return list(zip(x[rank::world].split(micro), y[rank::world].split(micro)))
    stream = ByteStream(paths[split], args.seq_len, args.seed, rank, world)
    if full:
        return stream.iter_eval(micro, rank, world)
    return [stream.batch(micro) for _ in range(args.eval_iters)]


@torch.no_grad()
def evaluate(model, batches, device, ctx, seed, accuracy):
    """Sums over this rank's batches: (nats, correct argmax predictions, counted targets).

    LSH draws random rotations at eval time too. A forked RNG with a fixed seed gives every eval the
    same rotations and leaves the training RNG untouched: evaluating never shifts training's draws,
    so a resumed run matches an uninterrupted one whatever the evals in between.
    """
    model.eval()
    nats = correct = count = 0
    cuda = [torch.device(device).index or 0] if device.startswith('cuda') else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            n = int((y != IGNORE_INDEX).sum())
            if n == 0:   # only padding (the tail of iter_eval): nothing to score
                continue
            with ctx:
                logits, loss = model(x, y)   # loss: the mean over the n counted targets
            nats, count = nats + loss.item() * n, count + n
            if accuracy:
                if logits is None:   # ff_chunks > 1 computes the loss in chunks, without logits
                    with ctx:
                        logits, _ = model(x)
                correct += masked_accuracy(logits, y)[0]
    model.train()
    return nats, correct, count


def all_reduce_sum(values, device, ddp):
    """Sum numbers over ranks: metrics are summed first and divided once, at the end."""
    if not ddp:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def metrics(args, nats, correct, count):
    if args.dataset == 'duplication':
        return {'loss': nats / count, 'accuracy': correct / count}
    return {'loss': nats / count, 'bpc': bits_per_char(nats, count)}


def describe(m):
    score = f"accuracy {100 * m['accuracy']:.2f}%" if 'accuracy' in m else f"bpc {m['bpc']:.4f}"
    return f"loss {m['loss']:.4f}, {score}"


# ----------------------------------------------------------------------------- checkpoints and logs

def rng_state(device):
    cuda = torch.cuda.get_rng_state(device) if device.startswith('cuda') else None
    return {'torch': torch.get_rng_state(), 'cuda': cuda, 'numpy': np.random.get_state(),
            'python': random.getstate()}


def set_rng_state(state, device):
    torch.set_rng_state(state['torch'])
    if state['cuda'] is not None and device.startswith('cuda'):
        torch.cuda.set_rng_state(state['cuda'], device)
    np.random.set_state(state['numpy'])
    random.setstate(state['python'])


def save_checkpoint(path, ckpt):
    """Write path.tmp, then rename it: a crash mid-write leaves the previous checkpoint whole."""
    torch.save(ckpt, path + '.tmp')
    os.replace(path + '.tmp', path)   # atomic


def load_checkpoint(path, flag):
    if not os.path.exists(path):
        raise SystemExit(f"error: {flag}: no checkpoint at {path}; train first, or point "
                         f"--out_dir at one")
    # weights_only=False: our own file, with NumPy and Python RNG states beside the tensors
    return torch.load(path, map_location='cpu', weights_only=False)


def params_fingerprint(model):
    """SHA-256 of every parameter and buffer, bit for bit: equal on all ranks iff in sync."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_log(path, record):
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')


def plot_curves(log_path, png_path):
    """The train and valid loss against step, from log.jsonl."""
    import matplotlib
    matplotlib.use('Agg')   # no display needed
    import matplotlib.pyplot as plt
    records = [json.loads(line) for line in open(log_path)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, label, marker in (('train', 'train', None), ('eval', 'valid', 'o')):
        points = [(r['step'], r['loss']) for r in records if r['kind'] == kind]
        if points:
            ax.plot(*zip(*points), label=label, marker=marker)
    ax.set(xlabel='step', ylabel='loss (nats per token)', yscale='log')
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- training

def forward_backward(model, train_data, scaler, ctx, args, micro, ddp, world, device):
    """The gradients of one optimizer step; returns the loss averaged over micro-steps and ranks."""
    loss_sum = torch.zeros((), device=device)
    for i in range(args.grad_accum):
        x, y = train_data.batch(micro, device)   # every rank its own batches: (seed, rank, k)
        # DDP all-reduces gradients in backward; no_sync skips that on all but the last micro-step
        with model.no_sync() if ddp and i < args.grad_accum - 1 else nullcontext():
            with ctx:
                _, loss = model(x, y)
            # each micro-batch loss is a mean, so dividing by grad_accum makes the accumulated
            # gradient the mean over the rank's batch; DDP then averages over the ranks
            scaler.scale(loss / args.grad_accum).backward()
        loss_sum += loss.detach().float()
    return all_reduce_sum([loss_sum.item() / args.grad_accum], device, ddp)[0] / world


def optimizer_step(model, optimizer, scaler, clip):
    """Clip, step, zero the gradients. Returns True if fp16 overflowed and the step was skipped."""
    if clip > 0:
        scaler.unscale_(optimizer)   # clip the true gradients, not the loss-scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    scale = scaler.get_scale()
    scaler.step(optimizer)           # fp16: skipped if a gradient is inf or nan
    scaler.update()                  # ... and then the loss scale shrinks
    optimizer.zero_grad(set_to_none=True)
    return scaler.is_enabled() and scaler.get_scale() < scale


def print_setup(args, config, model, world, micro, device, step):
    sees = {'lsh': f"{config.n_hashes} rounds x 2 x {config.bucket_size}",
            'full': f"all {args.seq_len}", 'local': f"2 x {config.bucket_size}"}
    kinds = dict.fromkeys(config.layer_attn())   # each kind once, in order
    attn = ', '.join(f"{a} (a query sees {sees[a]} keys)" for a in kinds)
    print(f"model: {model.num_params():,} parameters, {config.n_layers} layers of {attn}, "
          f"reversible={config.reversible}")
    print(f"data: {args.dataset}, vocab {config.vocab_size}, seq_len {args.seq_len}")
    print(f"tokens per step: {args.batch_size * args.seq_len:,} = {args.batch_size} sequences x "
          f"{args.seq_len} = {world} rank(s) x {args.grad_accum} grad-accumulation step(s) x "
          f"{micro} sequences x {args.seq_len}")
    print(f"device: {device}, dtype: {args.precision}, optimizer: {args.optimizer}, lr {args.lr:g} "
          f"({args.lr_schedule}, warmup {args.warmup}), steps {step} -> {args.max_steps}")


def train(args, ddp, rank, local_rank, world, device):
    master = rank == 0   # rank 0 alone prints progress and writes files
    ckpt_path = os.path.join(args.out_dir, 'ckpt.pt')
    log_path = os.path.join(args.out_dir, 'log.jsonl')
    config = model_config(args)
    ckpt = load_checkpoint(ckpt_path, '--resume') if args.resume else None
    if ckpt and ckpt['model_args'] != dataclasses.asdict(config):
        diff = {k: (v, ckpt['model_args'].get(k)) for k, v in dataclasses.asdict(config).items()
                if ckpt['model_args'].get(k) != v}
        raise SystemExit(f"error: --resume: model flags differ from the checkpoint's, as "
                         f"(flag, checkpoint): {diff}")
    torch.manual_seed(args.seed + rank)   # DDP then copies rank 0's initial weights to every rank
    if device.startswith('cuda'):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    train_data, paths = setup_data(args, rank, world, ddp)
    raw_model = build_model(config, device)
    optimizer = make_optimizer(args, raw_model)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=args.precision == 'fp16')
    step, saved_step, best_val = 0, None, float('inf')
    if ckpt:   # everything that decides the next step, so the continuation is exact
        raw_model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        scaler.load_state_dict(ckpt['scaler'])
        train_data.load_state_dict(ckpt['data'])
        step = saved_step = ckpt['step']
        best_val = ckpt['best_val']
        if len(ckpt['rng']) == world:   # one state per rank: dropout and LSH draws continue exactly
            set_rng_state(ckpt['rng'][rank], device)
        else:                           # another world size: fresh, different draws per rank
            torch.manual_seed(args.seed + rank + 1000 * step)
        del ckpt
    model = torch.compile(raw_model) if args.compile else raw_model
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device.startswith('cuda') else None)
    ctx = autocast_context(args.precision, device)
    micro = args.batch_size // (world * args.grad_accum)
    valid = eval_batches(args, paths, 'valid', rank, world, micro, full=False)
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        if args.resume:   # drop log lines written after the checkpoint, as if never interrupted
            lines = open(log_path).readlines() if os.path.exists(log_path) else []
            open(log_path, 'w').writelines(l for l in lines if json.loads(l)['step'] <= step)
        else:
            if os.path.exists(ckpt_path):
                print(f"note: overwriting {ckpt_path} (add --resume to continue it instead)")
            open(log_path, 'w').close()
        print_setup(args, config, raw_model, world, micro, device, step)
        if args.wandb:
            import wandb   # optional: only this flag needs it
            wandb.init(project='reformer', name=os.path.basename(os.path.abspath(args.out_dir)),
                       config=vars(args), resume='allow')

    def log(record):
        if master:
            write_log(log_path, record)
            if args.wandb:
                import wandb
                kind = record['kind']
                wandb.log({f'{kind}/{k}': v for k, v in record.items() if k not in ('kind', 'step')},
                          step=record['step'])

    def validate():
        sums = evaluate(raw_model, valid, device, ctx, args.seed + rank,
                        accuracy=args.dataset == 'duplication')
        return metrics(args, *all_reduce_sum(sums, device, ddp))

    def checkpoint():
        states = [rng_state(device)]   # every rank's RNG, so each rank resumes its own draws
        if ddp:
            states = [None] * world
            dist.all_gather_object(states, rng_state(device))
        if master:
            save_checkpoint(ckpt_path, {
                'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(),
                'scaler': scaler.state_dict(), 'step': step, 'rng': states,
                'data': train_data.state_dict(), 'model_args': dataclasses.asdict(config),
                'args': vars(args), 'best_val': best_val})

    bar = tqdm(total=args.max_steps, initial=step, disable=not master, dynamic_ncols=True)
    t_start, skipped, last = time.time(), 0, None
    while step < args.max_steps:
        step += 1
        t0 = time.time()
        lr = get_lr(step, args)
        for group in optimizer.param_groups:
            group['lr'] = lr
        loss = forward_backward(model, train_data, scaler, ctx, args, micro, ddp, world, device)
        if not math.isfinite(loss):   # the same on every rank: the loss was all-reduced
            bar.close()
            saved = f"{ckpt_path} (step {saved_step})" if saved_step is not None else "none yet"
            raise SystemExit(f"error: the training loss is {loss} at step {step}; stopping. Last "
                             f"good checkpoint: {saved}. Try a lower --lr, a longer --warmup, "
                             f"--clip or --precision=fp32, and continue with --resume.")
        skipped = skipped + 1 if optimizer_step(raw_model, optimizer, scaler, args.clip) else 0
        if skipped >= 3 and master:
            tqdm.write(f"warning: step {step}: fp16 gradients overflowed {skipped} steps in a "
                       f"row; those updates were skipped (loss scale now {scaler.get_scale():g})")
        tokens_per_s = args.batch_size * args.seq_len / (time.time() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
        if step % args.log_interval == 0:
            log({'kind': 'train', 'step': step, 'loss': loss, 'lr': lr,
                 'tokens_per_s': tokens_per_s})
        if step % args.eval_interval == 0 or step == args.max_steps:
            last = validate()
            best_val = min(best_val, last['loss'])
            log({'kind': 'eval', 'step': step, **last, 'time_s': time.time() - t_start})
            checkpoint()
            saved_step = step
            if master:
                tqdm.write(f"step {step}: valid {describe(last)}")
    bar.close()
    last = last or validate()   # resumed at max_steps: nothing trained, report what is there
    if ddp:
        check_in_sync(raw_model, world, master)
    if master:
        plot_curves(log_path, os.path.join(args.out_dir, 'loss.png'))
        print(f"step {step} after {time.time() - t_start:.1f} s; ckpt.pt, log.jsonl and loss.png "
              f"in {args.out_dir}")
        if 'accuracy' in last:
            print(f"final valid accuracy: {100 * last['accuracy']:.2f}% (loss {last['loss']:.4f})")
        else:
            print(f"final valid bpc: {last['bpc']:.4f} on {args.eval_iters} batches "
                  f"(--eval_only for the whole split)")
    return last


def check_in_sync(model, world, master):
    """DDP must leave every rank with the same weights; check it bit for bit."""
    prints = [None] * world
    dist.all_gather_object(prints, params_fingerprint(model))
    if len(set(prints)) != 1:
        raise SystemExit(f"error: the ranks ended with different parameters: {prints}")
    if master:
        print(f"parameters identical on all {world} ranks (sha256 {prints[0][:16]})")


def evaluate_checkpoint(args, ddp, rank, world, device):
    """--eval_only: the checkpoint in --out_dir on the full split, optionally with other attention.
    The model is the one in the checkpoint; the data flags come from the command line."""
    ckpt = load_checkpoint(os.path.join(args.out_dir, 'ckpt.pt'), '--eval_only')
    config = ModelConfig(**ckpt['model_args'])
    if args.seq_len > config.max_seq_len:
        raise SystemExit(f"error: --seq_len={args.seq_len} is longer than the checkpoint's "
                         f"max_seq_len={config.max_seq_len}")
    args.vocab_size = config.vocab_size
    model = build_model(config, device)
    model.load_state_dict(ckpt['model'])
    model.set_attention(attn=args.eval_attn, n_hashes=args.eval_n_hashes)
    attn, n_hashes = args.eval_attn or config.attn, args.eval_n_hashes or config.n_hashes
    _, paths = setup_data(args, rank, world, ddp)
    micro = args.batch_size // (world * args.grad_accum)
    batches = eval_batches(args, paths, args.eval_split, rank, world, micro, full=True)
    sums = evaluate(model, batches, device, autocast_context(args.precision, device),
                    args.seed + rank, accuracy=args.dataset == 'duplication')
    nats, correct, count = all_reduce_sum(sums, device, ddp)
    m = metrics(args, nats, correct, count)
    if rank == 0:
        write_log(os.path.join(args.out_dir, 'eval_only.jsonl'), {
            'step': ckpt['step'], 'split': args.eval_split, 'trained_attn': config.attn,
            'trained_n_hashes': config.n_hashes, 'eval_attn': attn, 'eval_n_hashes': n_hashes,
            'targets': int(count), **m})
        print(f"checkpoint at step {ckpt['step']}, trained with {config.attn} (n_hashes "
              f"{config.n_hashes}), evaluated with {attn} (n_hashes {n_hashes}) on "
              f"{int(count):,} {args.eval_split} targets")
        print(f"{args.eval_split}: {describe(m)}")
    return m


def main(argv=None):
    args = parse_args(argv)
    ddp, rank, local_rank, world, device = setup_distributed(args.device)
    try:
        if args.eval_only:
            result = evaluate_checkpoint(args, ddp, rank, world, device)
        else:
            result = train(args, ddp, rank, local_rank, world, device)
        if ddp:
            dist.barrier()   # leave together
        return result
    finally:
        if ddp:
            # DDP keeps the process group alive through reference cycles; collect them now, or
            # gloo's threads die during interpreter shutdown and abort the process now and then
            gc.collect()
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
