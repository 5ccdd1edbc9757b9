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
    torchrun --max_restarts=3 ... train.py ... --resume=auto      # preemptible: restarts resume

Several nodes and SLURM: see the README. All flags: python train.py --help (they live in flags.py;
the checkpoints' machinery in checkpoint.py). In an @FILE flags are separated by spaces or newlines
and '#' starts a comment; flags after it on the command line win.

The global batch of a language model is --batch_size sequences, batch_size * seq_len tokens per
optimizer step whatever the number of processes: each of the world_size ranks runs --grad_accum
micro-steps of batch_size / (world_size * grad_accum) sequences. A translation batch is counted in
tokens: --max_tokens padded tokens per step, split the same way, in batches of pairs of similar
length. Rank 0 writes into --out_dir: ckpt.pt (model, optimizer, scaler, step, RNG states, data
position, config, args), ckpt_best.pt (the weights of the eval with the lowest validation NLL,
not label-smoothed), log.jsonl (the training loss every --log_interval steps and every eval), at
the end loss.png, and under --average_last=N the last N evals' weights (ckpt_eval_STEP.pt) and
their mean (ckpt_avg.pt). SIGTERM or Ctrl-C stops after the current optimizer step with a
checkpoint; a second signal stops at once.
"""
import dataclasses
import gc
import glob
import json
import math
import os
import signal
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import plot
from checkpoint import (StopSignal, average_checkpoints, load_checkpoint, params_fingerprint,
                        rng_state, save_checkpoint, set_rng_state)
from data import (IGNORE_INDEX, ByteStream, DownloadError, DuplicationTask, bits_per_char,
                  masked_accuracy, prepare_dataset)
from flags import model_config, parse_args, step_batch   # the command line: python train.py -h
from model import ModelConfig, ReformerLM
from translation.encdec import EncDecConfig, ReformerEncDec
from translation.translation_data import (TRANSLATION_DATASETS, real_tokens, setup_translation,
                                          translation_eval_batches, translation_metrics)


# ----------------------------------------------------------------------------- where it runs

@dataclasses.dataclass
class Run:
    """This process's place in the job; torchrun sets RANK, LOCAL_RANK and WORLD_SIZE."""
    ddp: bool
    rank: int
    local_rank: int
    world: int
    device: str
    micro: int   # one micro-step's batch on this rank: step_batch / (world * grad_accum), in
                 # sequences (a language model) or padded tokens (translation)

    @property
    def master(self):   # rank 0 alone prints progress and writes files
        return self.rank == 0


def setup_run(args):
    device = args.device or ('cuda' if torch.cuda.is_available() else
                             'mps' if torch.backends.mps.is_available() else 'cpu')
    ddp = int(os.environ.get('RANK', -1)) != -1
    rank, local_rank, world = 0, 0, 1
    if ddp:
        rank, local_rank = int(os.environ['RANK']), int(os.environ['LOCAL_RANK'])
        if device.startswith('cuda'):
            device = f'cuda:{local_rank}'
            torch.cuda.set_device(device)
        dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
        world = dist.get_world_size()
    return Run(ddp, rank, local_rank, world, device, step_batch(args) // (world * args.grad_accum))


def all_reduce_sum(values, run):
    """Sum numbers over ranks: metrics are summed first and divided once, at the end."""
    if not run.ddp:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=run.device)
    dist.all_reduce(t)
    return t.tolist()


def autocast_context(precision, device):
    """Autocast for the forward pass (nullcontext for fp32); backward runs outside it."""
    if precision == 'fp32':
        return nullcontext()
    if precision == 'bf16' and device.startswith('cuda') and not torch.cuda.is_bf16_supported():
        raise SystemExit("error: --precision=bf16: this GPU has no bfloat16; use fp16 or fp32")
    dtype = torch.bfloat16 if precision == 'bf16' else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


# ----------------------------------------------------------------------------- data and metrics

def setup_data(args, run):
    """(train stream, split paths). Byte data is prepared once, on rank 0, while the others wait."""
    if args.dataset == 'duplication':
        return DuplicationTask(args.vocab_size, args.seq_len, args.seed, run.rank, run.world), None
    prepare = lambda: prepare_dataset(args.dataset, args.data_dir, args.data_path,
                                      args.enwik8_split, args.seq_len)
    try:
        paths = prepare() if run.rank == 0 else None
        if run.ddp:
            dist.barrier()
        paths = paths or prepare()   # the other ranks find rank 0's finished files and return
        return ByteStream(paths['train'], args.seq_len, args.seed, run.rank, run.world), paths
    except (OSError, ValueError, DownloadError) as e:   # a missing file, no network: says the fix
        raise SystemExit(f"error: {e}")


def eval_batches(args, paths, split, run, full):
    """This rank's share of the held-out data in batches of run.micro sequences: the duplication
    task's fixed validation set; or for bytes --eval_iters random batches (the same at every eval),
    or with full=True every window of the split (ByteStream.iter_eval)."""
    if args.dataset == 'duplication':
        x, y = DuplicationTask(args.vocab_size, args.seq_len, args.seed).valid_set(args.valid_size)
        return list(zip(x[run.rank::run.world].split(run.micro),
                        y[run.rank::run.world].split(run.micro)))
    stream = ByteStream(paths[split], args.seq_len, args.seed, run.rank, run.world)
    if full:
        return stream.iter_eval(run.micro, run.rank, run.world)
    return [stream.batch(run.micro) for _ in range(args.eval_iters)]


def metrics(args, nats, nll_nats, correct, count):
    """A language model's loss is its NLL (no label smoothing): nll_nats equals nats."""
    if args.dataset == 'duplication':
        return {'loss': nats / count, 'accuracy': correct / count}
    return {'loss': nats / count, 'bpc': bits_per_char(nats, count)}


# ----------------------------------------------------------------------------- model, optimizer

def build_model(fam, config, device):
    try:
        return fam.model(config).to(device)
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


def forward_backward(model, train_data, scaler, ctx, args, run, count_tokens):
    """The gradients of one optimizer step; returns (the loss averaged over micro-steps and ranks,
    the tokens of the step's batches summed over them, as count_tokens counts them)."""
    loss_sum = torch.zeros((), device=run.device)
    tokens = 0
    for i in range(args.grad_accum):
        # every rank its own batch: (x, y) for a language model, (src, tgt_in, y) for translation
        batch = train_data.batch(run.micro, run.device)
        tokens = tokens + count_tokens(batch)
        # DDP all-reduces gradients in backward; no_sync skips that on all but the last micro-step
        with model.no_sync() if run.ddp and i < args.grad_accum - 1 else nullcontext():
            with ctx:
                _, loss = model(*batch)
            # each micro-batch loss is a mean, so dividing by grad_accum makes the accumulated
            # gradient the mean over the rank's batch; DDP then averages over the ranks
            scaler.scale(loss / args.grad_accum).backward()
        loss_sum += loss.detach().float()
    loss, tokens = all_reduce_sum([loss_sum.item() / args.grad_accum, float(tokens)], run)
    return loss / run.world, tokens


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


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, batches, device, ctx, seed, accuracy):
    """Sums over this rank's batches: (nats of the loss, nats of the NLL, correct argmax
    predictions, counted targets). The two nats differ for a label-smoothed model (translation):
    its loss is the smoothed cross-entropy it trains on, its NLL is -log p(target), the number
    whose exp is a perplexity and by which ckpt_best.pt is chosen.

    LSH draws random rotations at eval time too. A forked RNG with a fixed seed gives every eval the
    same rotations and leaves the training RNG untouched: evaluating never shifts training's draws,
    so a resumed run matches an uninterrupted one whatever the evals in between.
    """
    model.eval()
    smoothed = getattr(model.config, 'label_smoothing', 0.0) > 0
    nats = nll = correct = count = 0
    cuda = [torch.device(device).index or 0] if device.startswith('cuda') else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for batch in batches:   # (x, y), or (src, tgt_in, y) for translation
            *x, y = [t.to(device) for t in batch]
            n = int((y != IGNORE_INDEX).sum())
            if n == 0:   # only padding (the tail of iter_eval): nothing to score
                continue
            with ctx:
                logits, loss = model(*x, y)   # loss: the mean over the n counted targets
                if logits is None and (accuracy or smoothed):   # ff_chunks > 1: no logits
                    logits, _ = model(*x)
            nats, count = nats + loss.item() * n, count + n
            if smoothed:   # -log p(target) summed over the n targets, from the same logits
                nll += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(),
                                       ignore_index=IGNORE_INDEX, reduction='sum').item()
            else:          # the loss is the NLL
                nll += loss.item() * n
            if accuracy:
                correct += masked_accuracy(logits, y)[0]
    model.train()
    return nats, nll, correct, count


def validate(fam, model, batches, args, run, ctx):
    """The metrics over all ranks' share of `batches`."""
    sums = fam.evaluate(model, batches, run.device, ctx, args.seed + run.rank,
                        accuracy=has_accuracy(args))
    return fam.metrics(args, *all_reduce_sum(sums, run))


def has_accuracy(args):
    """Argmax accuracy is scored for the duplication task and (teacher-forced) for translation."""
    return args.dataset not in ('enwik8', 'text')


def describe(m):
    score = f"accuracy {100 * m['accuracy']:.2f}%" if 'accuracy' in m else f"bpc {m['bpc']:.4f}"
    if 'nll' in m:   # translation: the loss is label-smoothed, the NLL is not
        return f"loss {m['loss']:.4f} (as trained), nll {m['nll']:.4f}, ppl {m['ppl']:.2f}, {score}"
    return f"loss {m['loss']:.4f}, {score}"


# ----------------------------------------------------------------------------- the model family

@dataclasses.dataclass(frozen=True)
class Family:
    """What train() needs from a family of models, chosen in one place (family(args) below): the
    config dataclass (its fields are the model flags), the model class, the training stream, the
    held-out batches, the evaluation and the metrics. The language model is the only family so
    far; another (an encoder-decoder for translation) is one more Family and one more line in
    family(), with its own config's flags added in flags.py (add_config_flags)."""
    config: type
    model: type
    setup_data: object     # (args, run) -> (stream with .batch(n, device) and .state_dict(), paths)
    eval_batches: object   # (args, paths, split, run, full) -> iterable of (x, y)
    evaluate: object       # (model, batches, device, ctx, seed, accuracy) -> sums to all-reduce
    metrics: object        # (args, *those sums) -> {'loss': ..., ...}
    count_tokens: object   # (batch) -> the tokens that tok/s counts
    tokens_name: str       # the log's name for tok/s, saying what it counts
    report: object = None  # (model, args, data, run) -> final metrics beyond the loss, or None


def translation_report(model, args, data, run):
    """The end of a translation run: exact match on the reverse task's held-out strings, or
    greedy sacreBLEU on the first valid_size valid pairs (beam search on the test set:
    python -m translation.translate --eval)."""
    from translation.translate import evaluate as bleu, exact_match   # sacrebleu only now
    if args.dataset == 'reverse':
        return {'exact_match': exact_match(model, data['task'].heldout_set(args.valid_size),
                                           device=run.device)}
    r = bleu(model, data['tokenizer'], data['text']['valid'][:args.valid_size], beam_size=1,
             device=run.device)
    return {'valid_bleu_greedy': r['bleu'], 'bleu_signature': r['bleu_signature']}


def lm_tokens(batch):
    """Every token of a language model's batch (x, y) is real: B x T."""
    return batch[0].numel()


LANGUAGE_MODEL = Family(ModelConfig, ReformerLM, setup_data, eval_batches, evaluate, metrics,
                        lm_tokens, 'tokens_per_s')
# translation's tok/s: the source and target tokens that are not padding (translation_data)
TRANSLATION = Family(EncDecConfig, ReformerEncDec, setup_translation, translation_eval_batches,
                     evaluate, translation_metrics, real_tokens, 'real_src_tgt_tokens_per_s',
                     translation_report)


def family(args):
    """The family that --dataset asks for: duplication, enwik8 and text train a language model;
    reverse, parallel and wmt14 the encoder-decoder."""
    return TRANSLATION if args.dataset in TRANSLATION_DATASETS else LANGUAGE_MODEL


# ----------------------------------------------------------------------------- checkpoints and logs

def ckpt_path(args, kind='last'):
    """out_dir/ckpt.pt (last: the training state), ckpt_best.pt or ckpt_avg.pt (weights)."""
    name = {'last': 'ckpt.pt', 'best': 'ckpt_best.pt', 'avg': 'ckpt_avg.pt'}[kind]
    return os.path.join(args.out_dir, name)


def eval_checkpoints(out_dir):
    """The ckpt_eval_STEP.pt files in out_dir, oldest step first."""
    paths = glob.glob(os.path.join(out_dir, 'ckpt_eval_*.pt'))
    return sorted(paths, key=lambda p: int(os.path.basename(p)[len('ckpt_eval_'):-len('.pt')]))


def save_training_state(args, run, step, best_val, model, optimizer, scaler, train_data, config):
    """Everything that decides the next step, so that a resumed run continues exactly."""
    states = [rng_state(run.device)]   # every rank's RNG, so each rank resumes its own draws
    if run.ddp:
        states = [None] * run.world
        dist.all_gather_object(states, rng_state(run.device))
    if run.master:
        save_checkpoint(ckpt_path(args), {
            'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
            'scaler': scaler.state_dict(), 'step': step, 'rng': states,
            'data': train_data.state_dict(), 'model_args': dataclasses.asdict(config),
            'args': vars(args), 'best_val': best_val})


def weights_checkpoint(s, args, valid):
    """What translate.py and sample.py read, without the training state: the model, its config,
    the flags, the step, the data's state (a translation corpus keeps its tokenizer there) and
    the validation metrics of these weights."""
    return {'model': s.raw_model.state_dict(), 'model_args': dataclasses.asdict(s.config),
            'args': vars(args), 'step': s.step, 'data': s.train_data.state_dict(), 'valid': valid}


def keep_eval_weights(s, args, run, valid):
    """After an eval, on rank 0: ckpt_best.pt when the validation NLL is the lowest so far (for
    translation not the label-smoothed loss, which rewards spreading probability), and under
    --average_last=N this eval's weights as ckpt_eval_STEP.pt, all but the newest N deleted."""
    nll = valid.get('nll', valid['loss'])   # a language model's loss is its NLL
    improved = nll < s.best_val
    s.best_val = min(s.best_val, nll)
    if not run.master or not (improved or args.average_last):
        return
    weights = weights_checkpoint(s, args, valid)
    if improved:
        save_checkpoint(ckpt_path(args, 'best'), weights)
    if args.average_last:
        save_checkpoint(os.path.join(args.out_dir, f'ckpt_eval_{s.step}.pt'), weights)
        for old in eval_checkpoints(args.out_dir)[:-args.average_last]:
            os.remove(old)


def write_average(args, step):
    """--average_last=N at the end, on rank 0: ckpt_avg.pt, the parameter mean of the newest N
    ckpt_eval_STEP.pt up to `step` (checkpoint.average_checkpoints). Returns their steps."""
    paths = [p for p in eval_checkpoints(args.out_dir)
             if int(os.path.basename(p)[len('ckpt_eval_'):-len('.pt')]) <= step]
    avg = average_checkpoints(paths[-args.average_last:])
    save_checkpoint(ckpt_path(args, 'avg'), avg)
    return avg['averaged_steps']


def resume_from(args, config):
    """The checkpoint to continue (--resume, or --resume=auto when there is one), else None."""
    path = ckpt_path(args)
    if not args.resume or (args.resume == 'auto' and not os.path.exists(path)):
        return None
    ckpt = load_checkpoint(path, '--resume')
    if ckpt['model_args'] != dataclasses.asdict(config):
        diff = {k: (v, ckpt['model_args'].get(k)) for k, v in dataclasses.asdict(config).items()
                if ckpt['model_args'].get(k) != v}
        raise SystemExit(f"error: --resume: model flags differ from the checkpoint's, as "
                         f"(flag, checkpoint): {diff}")
    return ckpt


def restore(ckpt, model, optimizer, scaler, train_data, args, run):
    """Load a checkpoint into the fresh objects; returns (step, best_val)."""
    model.load_state_dict(ckpt['model'])
    optimizer.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt['scaler'])
    train_data.load_state_dict(ckpt['data'])
    if len(ckpt['rng']) == run.world:   # one state per rank: dropout and LSH draws continue exactly
        set_rng_state(ckpt['rng'][run.rank], run.device)
    else:                               # another world size: fresh, different draws per rank
        torch.manual_seed(args.seed + run.rank + 1000 * ckpt['step'])
    return ckpt['step'], ckpt['best_val']


def start_log(args, step, resumed):
    """Rank 0: log.jsonl up to `step` (a resumed run drops what came after its checkpoint)."""
    os.makedirs(args.out_dir, exist_ok=True)
    log_path = os.path.join(args.out_dir, 'log.jsonl')
    lines = open(log_path).readlines() if resumed and os.path.exists(log_path) else []
    if not resumed and os.path.exists(ckpt_path(args)):
        print(f"note: overwriting {ckpt_path(args)} (add --resume to continue it instead)")
    kept = []
    for line in lines:
        if not line.endswith('\n') or json.loads(line)['step'] > step:
            break   # a kill can cut the last line short: it and what follows are dropped
        kept.append(line)
    with open(log_path + '.tmp', 'w') as f:   # atomic, like the checkpoint
        f.writelines(kept)
    os.replace(log_path + '.tmp', log_path)
    if args.wandb:
        import wandb   # optional: only this flag needs it
        wandb.init(project='reformer', name=os.path.basename(os.path.abspath(args.out_dir)),
                   config=vars(args), resume='allow')


def log(args, run, record):
    if not run.master:
        return
    with open(os.path.join(args.out_dir, 'log.jsonl'), 'a') as f:
        f.write(json.dumps(record) + '\n')
    if args.wandb:
        import wandb
        wandb.log({f"{record['kind']}/{k}": v for k, v in record.items()
                   if k not in ('kind', 'step')}, step=record['step'])


def print_setup(args, config, model, run, step):
    sees = {'lsh': f"{config.n_hashes} rounds x 2 x {config.bucket_size}",
            'full': f"all {args.seq_len}", 'local': f"2 x {config.bucket_size}"}
    translation = isinstance(config, EncDecConfig)
    kinds = dict.fromkeys(config.layer_attn())   # each kind once, in order
    attn = ', '.join(f"{a} (a query sees {sees.get(a, sees['full'])} keys)" for a in kinds)
    layers = (f"{config.n_layers} encoder layers of {attn} + {config.n_dec_layers} decoder "
              f"layers (causal full, cross-attention)" if translation
              else f"{config.n_layers} layers of {attn}")
    print(f"model: {model.num_params():,} parameters, {layers}, reversible={config.reversible}")
    print(f"data: {args.dataset}, vocab {config.vocab_size}, seq_len {args.seq_len}")
    split = f"{run.world} rank(s) x {args.grad_accum} grad-accumulation step(s) x {run.micro:,}"
    if translation:
        print(f"tokens per step: at most {args.max_tokens:,} padded (B x max(S, T)) = {split} "
              f"padded tokens, in batches of pairs of similar length")
    else:
        print(f"tokens per step: {args.batch_size * args.seq_len:,} = {args.batch_size} sequences "
              f"x {args.seq_len} = {split} sequences x {args.seq_len}")
    print(f"device: {run.device}, dtype: {args.precision}, optimizer: {args.optimizer}, lr "
          f"{args.lr:g} ({args.lr_schedule}, warmup {args.warmup}), steps {step} -> "
          f"{args.max_steps}")


# ----------------------------------------------------------------------------- training

@dataclasses.dataclass
class State:
    """What the training loop carries from step to step."""
    model: torch.nn.Module        # what forward runs: raw_model, compiled and/or DDP-wrapped
    raw_model: torch.nn.Module    # what is saved and evaluated
    config: object
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_data: object
    valid: list
    ctx: object                   # the autocast context of the forward pass
    step: int = 0
    best_val: float = float('inf')   # the lowest validation NLL so far: ckpt_best.pt's
    saved_step: int = None        # the step of the last checkpoint written or resumed
    overflows: int = 0            # fp16 steps skipped in a row


def setup_training(args, run, fam):
    """Data, model, optimizer and scaler; continued from the checkpoint under --resume."""
    train_data, paths = fam.setup_data(args, run)   # first: a tokenizer sets --vocab_size
    config = model_config(args)
    ckpt = resume_from(args, config)
    torch.manual_seed(args.seed + run.rank)   # DDP then copies rank 0's initial weights to all
    if run.device.startswith('cuda'):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    raw_model = build_model(fam, config, run.device)
    optimizer = make_optimizer(args, raw_model)
    scaler = torch.amp.GradScaler(torch.device(run.device).type, enabled=args.precision == 'fp16')
    model = torch.compile(raw_model) if args.compile else raw_model
    if run.ddp:
        model = DDP(model, device_ids=[run.local_rank] if run.device.startswith('cuda') else None)
    s = State(model, raw_model, config, optimizer, scaler, train_data,
              fam.eval_batches(args, paths, 'valid', run, full=False),
              autocast_context(args.precision, run.device))
    if ckpt:
        s.step, s.best_val = restore(ckpt, raw_model, optimizer, scaler, train_data, args, run)
        s.saved_step = s.step
    return s, paths


def train_step(s, fam, args, run):
    """One optimizer step at s.step; returns (loss, lr, tokens/s as fam counts them). Stops on a
    NaN loss."""
    t0 = time.time()
    lr = get_lr(s.step, args)
    for group in s.optimizer.param_groups:
        group['lr'] = lr
    loss, tokens = forward_backward(s.model, s.train_data, s.scaler, s.ctx, args, run,
                                    fam.count_tokens)
    if not math.isfinite(loss):   # the same on every rank: the loss was all-reduced
        stop_on_nan(args, loss, s.step, s.saved_step)
    skipped = optimizer_step(s.raw_model, s.optimizer, s.scaler, args.clip)
    s.overflows = s.overflows + 1 if skipped else 0
    if s.overflows >= 3 and run.master:
        tqdm.write(f"warning: step {s.step}: fp16 gradients overflowed {s.overflows} steps in a "
                   f"row; those updates were skipped (loss scale now {s.scaler.get_scale():g})")
    return loss, lr, tokens / (time.time() - t0)


def eval_and_log(s, fam, args, run, t_start):
    last = validate(fam, s.raw_model, s.valid, args, run, s.ctx)
    keep_eval_weights(s, args, run, last)
    log(args, run, {'kind': 'eval', 'step': s.step, **last, 'time_s': time.time() - t_start})
    if run.master:
        tqdm.write(f"step {s.step}: valid {describe(last)}")
    return last


def save(s, args, run):
    save_training_state(args, run, s.step, s.best_val, s.raw_model, s.optimizer, s.scaler,
                        s.train_data, s.config)
    s.saved_step = s.step


def train(args, run):
    fam = family(args)
    s, paths = setup_training(args, run, fam)
    if run.master:
        start_log(args, s.step, resumed=s.saved_step is not None)
        print_setup(args, s.config, s.raw_model, run, s.step)
    bar = tqdm(total=args.max_steps, initial=s.step, disable=not run.master, dynamic_ncols=True)
    t_start, last = time.time(), None
    with StopSignal() as stop:
        while s.step < args.max_steps:
            s.step += 1
            loss, lr, tokens_per_s = train_step(s, fam, args, run)
            bar.update(1)
            bar.set_postfix({'loss': f"{loss:.4f}", fam.tokens_name: f"{tokens_per_s:,.0f}"})
            if s.step % args.log_interval == 0:
                log(args, run, {'kind': 'train', 'step': s.step, 'loss': loss, 'lr': lr,
                                fam.tokens_name: tokens_per_s})
            # every rank stops at the same step: stop when any rank got a signal
            stopping = all_reduce_sum([stop.requested], run)[0] > 0 and s.step < args.max_steps
            at_eval = s.step % args.eval_interval == 0 or s.step == args.max_steps
            if at_eval:
                last = eval_and_log(s, fam, args, run, t_start)
            if at_eval or stopping:
                save(s, args, run)
            if stopping:
                bar.close()
                exit_on_signal(args, run, stop, s.step)
    bar.close()
    last = last or validate(fam, s.raw_model, s.valid, args, run, s.ctx)   # resumed at the end
    if run.ddp:
        check_in_sync(s.raw_model, run)
    if fam.report and run.master:
        last = {**last, **fam.report(s.raw_model, args, paths, run)}
        log(args, run, {'kind': 'final', 'step': s.step, **last})
    if run.master:
        averaged = write_average(args, s.step) if args.average_last else None
        print_end(args, s.step, last, time.time() - t_start, averaged)
    return last


def exit_on_signal(args, run, stop, step):
    if run.master:
        print(f"stopped by {signal.Signals(stop.signum or signal.SIGTERM).name} after step {step} "
              f"of {args.max_steps}; checkpoint: {ckpt_path(args)}. To continue, run the same "
              f"command with --resume (or --resume=auto).", flush=True)
    raise SystemExit(128 + (stop.signum or signal.SIGTERM))


def stop_on_nan(args, loss, step, saved_step):
    saved = f"{ckpt_path(args)} (step {saved_step})" if saved_step else "none yet"
    raise SystemExit(f"error: the training loss is {loss} at step {step}; stopping. Last good "
                     f"checkpoint: {saved}. Try a lower --lr, a longer --warmup, --clip or "
                     f"--precision=fp32, and continue with --resume.")


def print_end(args, step, last, seconds, averaged):
    """Rank 0, after the last step: loss.png, the checkpoints, and the final validation score
    last."""
    log_path = os.path.join(args.out_dir, 'log.jsonl')
    plot.loss_curves([json.loads(line) for line in open(log_path)],
                     os.path.join(args.out_dir, 'loss.png'))
    print(f"step {step} after {seconds:.1f} s; ckpt.pt, log.jsonl and loss.png in {args.out_dir}")
    if os.path.exists(ckpt_path(args, 'best')):
        best = torch.load(ckpt_path(args, 'best'), map_location='cpu', weights_only=False)
        print(f"ckpt_best.pt: step {best['step']}, the lowest valid NLL, "
              f"{best['valid'].get('nll', best['valid']['loss']):.4f}")
    if averaged:
        print(f"ckpt_avg.pt: the parameter mean of the evals at steps {averaged}")
    if 'exact_match' in last:
        print(f"final held-out exact match: {100 * last['exact_match']:.2f}% (teacher-forced "
              f"token accuracy {100 * last['accuracy']:.2f}%, loss {last['loss']:.4f})")
    elif 'valid_bleu_greedy' in last:
        print(f"final valid sacreBLEU (greedy, first {args.valid_size} pairs): "
              f"{last['valid_bleu_greedy']:.2f} ({last['bleu_signature']}); teacher-forced "
              f"token accuracy {100 * last['accuracy']:.2f}%. Test set, beam search: python -m "
              f"translation.translate --out_dir={args.out_dir} --eval")
    elif 'accuracy' in last:
        print(f"final valid accuracy: {100 * last['accuracy']:.2f}% (loss {last['loss']:.4f})")
    else:
        print(f"final valid bpc: {last['bpc']:.4f} on {args.eval_iters} batches "
              f"(--eval_only for the whole split)")


def check_in_sync(model, run):
    """DDP must leave every rank with the same weights; check it bit for bit."""
    prints = [None] * run.world
    dist.all_gather_object(prints, params_fingerprint(model))
    if len(set(prints)) != 1:
        raise SystemExit(f"error: the ranks ended with different parameters: {prints}")
    if run.master:
        print(f"parameters identical on all {run.world} ranks (sha256 {prints[0][:16]})")


def evaluate_checkpoint(args, run):
    """--eval_only: the checkpoint in --out_dir on the full split, optionally with other attention.
    The model is the one in the checkpoint; the data flags come from the command line."""
    fam = family(args)
    ckpt = load_checkpoint(ckpt_path(args, args.eval_checkpoint), '--eval_only')
    config = fam.config(**ckpt['model_args'])
    if args.seq_len > config.max_seq_len:
        raise SystemExit(f"error: --seq_len={args.seq_len} is longer than the checkpoint's "
                         f"max_seq_len={config.max_seq_len}")
    args.vocab_size = config.vocab_size
    model = build_model(fam, config, run.device)
    model.load_state_dict(ckpt['model'])
    model.set_attention(attn=args.eval_attn, n_hashes=args.eval_n_hashes)
    attn, n_hashes = args.eval_attn or config.attn, args.eval_n_hashes or config.n_hashes
    _, paths = fam.setup_data(args, run)
    batches = fam.eval_batches(args, paths, args.eval_split, run, full=True)
    sums = fam.evaluate(model, batches, run.device, autocast_context(args.precision, run.device),
                        args.seed + run.rank, accuracy=has_accuracy(args))
    sums = all_reduce_sum(sums, run)
    m, count = fam.metrics(args, *sums), sums[-1]
    if run.master:
        with open(os.path.join(args.out_dir, 'eval_only.jsonl'), 'a') as f:
            f.write(json.dumps({
                'step': ckpt['step'], 'split': args.eval_split, 'trained_attn': config.attn,
                'trained_n_hashes': config.n_hashes, 'eval_attn': attn, 'eval_n_hashes': n_hashes,
                'targets': int(count), **m}) + '\n')
        print(f"{os.path.basename(ckpt_path(args, args.eval_checkpoint))} at step "
              f"{ckpt['step']}, trained with {config.attn} (n_hashes "
              f"{config.n_hashes}), evaluated with {attn} (n_hashes {n_hashes}) on "
              f"{int(count):,} {args.eval_split} targets")
        print(f"{args.eval_split}: {describe(m)}")
    return m


def main(argv=None):
    args = parse_args(argv)
    run = setup_run(args)
    try:
        result = evaluate_checkpoint(args, run) if args.eval_only else train(args, run)
        if run.ddp:
            dist.barrier()   # leave together
        return result
    finally:
        if run.ddp:
            # DDP keeps the process group alive through reference cycles; collect them now, or
            # gloo's threads die during interpreter shutdown and abort the process now and then
            gc.collect()
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
