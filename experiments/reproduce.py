"""
Reproduce the Reformer paper's claims (Kitaev, Kaiser, Levskaya, ICLR 2020) at CPU scale, one
command per experiment. Each experiment trains and evaluates a few small models through train.py
(its command-line flags, in subprocesses) and writes experiments/results/NAME.json (every run's config, seed,
command, device, machine load, wall time, final metrics and curves) and results/NAME.png (the
curves against steps and against wall time).

    python -m experiments.reproduce corpus        # prepare the text corpus (needs: apt-get install python3.11-doc)
    python -m experiments.reproduce length        # how many steps the LM runs need to finish
    python -m experiments.reproduce table2        # paper Table 2: duplication, train x eval attention matrix
    python -m experiments.reproduce table2_sparse # Table 2 with the paper's 1-layer d256 model, 1/8 sparse
    python -m experiments.reproduce hashes        # paper Figure 4: LSH-1/2/4/8 against full attention
    python -m experiments.reproduce qk            # paper Figure 3 left: shared against separate QK
    python -m experiments.reproduce reversible    # paper Figure 3 right: reversible against ordinary layers
    python -m experiments.reproduce depth         # the fastai reproduction's Section 4.8: 1 / 2 / 4 layers
    python -m experiments.reproduce pattern       # the authors' local,local,lsh,local against all-LSH, all-local
    python -m experiments.reproduce plateau       # diagnostic: why LSH leaves the bigram plateau late
    python -m experiments.reproduce all           # all of the above, in that order
    python -m experiments.reproduce parallel_small  # the bare translation command, timed (~1 h)
    python -m experiments.reproduce averaging     # that run continued, its last evals averaged
    python -m experiments.report                  # experiments/RESULTS.md and the README's blocks, from the JSON
    python -m experiments.reproduce hashes --paper --device=cuda   # the paper's sizes (configs/*.args), a GPU

Resumable: a finished run is never redone (its out_dir holds run.json, written last); an
interrupted one continues from its checkpoint with train.py --resume; results/NAME.json is
rewritten (atomically) after every run, failed runs included. Runs with identical flags are
shared between experiments (the out_dir is named by a hash of the flags).

The corpus (why this one): enwik8 cannot be downloaded here, and the text must come from a package
registry. Debian's python3.11-doc ships the reStructuredText sources of the Python 3.11
documentation, 497 files, 11.0 MB: English prose written by people, with code examples in
between, much like enwik8 is prose with wiki markup. `corpus` concatenates them in a fixed order
(sorted by the MD5 of their relative path, so the 5 % valid and test splits that data.py takes
from the end are a mix of the whole documentation, not the last directories) into
data/python_docs.txt. Licence: the PSF licence (/usr/share/doc/python3.11-doc/copyright).
"""
import argparse
import contextlib
import glob
import hashlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository root
CORPUS = os.path.join('data', 'python_docs.txt')
CORPUS_SOURCES = '/usr/share/doc/python3*/html/_sources'
CORPUS_INSTALL = 'apt-get install python3.11-doc'


# ----------------------------------------------------------------------------- the corpus

def prepare_corpus(out=CORPUS, sources=CORPUS_SOURCES):
    """Concatenate the Python docs' .rst.txt sources into `out`, deterministically; returns the
    path. Does nothing when `out` exists. The files go in the order of the MD5 of their path
    relative to the _sources folder, each preceded by that path as a header line."""
    if os.path.exists(out):
        return out
    dirs = sorted(glob.glob(sources))
    if not dirs:
        raise SystemExit(f"error: no Python documentation sources at {sources}; install them with "
                         f"`{CORPUS_INSTALL}` (Debian/Ubuntu), or pass --corpus_sources=DIR "
                         f"(any folder of .rst.txt files)")
    src = dirs[-1]
    files = glob.glob(os.path.join(src, '**', '*.rst.txt'), recursive=True)
    if not files:
        raise SystemExit(f"error: {src} holds no .rst.txt files; expected the Python docs' "
                         f"_sources folder (`{CORPUS_INSTALL}`)")
    rel = sorted((os.path.relpath(f, src) for f in files),
                 key=lambda r: hashlib.md5(r.encode()).hexdigest())
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    with open(out + '.part', 'wb') as f:
        for r in rel:
            f.write(f'\n.. file: {r}\n\n'.encode())
            with open(os.path.join(src, r), 'rb') as g:
                f.write(g.read())
    os.replace(out + '.part', out)
    print(f"corpus: {len(rel)} files from {src}, {os.path.getsize(out):,} bytes -> {out}")
    return out


def corpus_info(path):
    with open(path, 'rb') as f:
        data = f.read()
    return {'path': path, 'bytes': len(data), 'md5': hashlib.md5(data).hexdigest()}


# ----------------------------------------------------------------------------- the experiments
# Each experiment: base flags (CPU scale and paper scale), variants (label -> extra flags), the
# evaluations of each trained model (label -> extra --eval_only flags), and the seeds. Variant
# flags come after the base ones, so they win.

# Table 2 at CPU scale. T = 128, bucket 16: a query sees 2 x 16 = 32 of 128 keys in each LSH
# round (1/4; causally at most its own chunk and the one before). Vocab 16 keeps the paper's
# ambiguity: every symbol occurs ~4 times in each half (63 / 15), as in the paper (511 / 127), so
# the copy is found by position and content, not content alone. The default run's model
# (2 layers, d_model 64) and optimiser; T = 64 is not sparse (a query sees half the keys).
DUP_BASE = ['--dataset=duplication', '--vocab_size=16', '--seq_len=128', '--bucket_size=16',
            '--n_layers=2', '--d_model=64', '--d_ff=128', '--n_heads=4', '--pos_emb=absolute',
            '--shared_qk=True', '--reversible=True', '--batch_size=32', '--lr=6e-3',
            '--warmup=20', '--max_steps=1000', '--eval_interval=100', '--valid_size=256']

# Language modelling at CPU scale, on the corpus above, bits per byte on the whole valid split.
# The Transformer baseline: full attention, separate QK, ordinary residual layers; each
# experiment changes one thing. T = 256 and bucket 16: an LSH query sees 32 of 256 keys per round
# (1/8). T = 512 (1/16) would double the cost of every run; lr 3e-3 with 50 warmup steps
# (not 1e-3) because at 1e-3 even full attention sat on the bigram plateau for ~600 steps.
# Cosine decay to 10 % of the peak over LM_STEPS steps; `length` measures how far each length
# still falls over its last 20 % (experiments/RESULTS.md), and 4800 is the longest that fits the
# CPU budget for 3 seeds of a comparison. The evals during training use 32 fixed batches
# (131,072 tokens), so the exit steps hold.
LM_STEPS = 4800
LM_BASE = ['--dataset=text', f'--data_path={CORPUS}', '--data_dir=data', '--seq_len=256',
           '--n_layers=2', '--d_model=128', '--d_ff=256', '--n_heads=4', '--bucket_size=16',
           '--pos_emb=axial', '--attn=full', '--shared_qk=False', '--reversible=False',
           '--batch_size=16', '--lr=3e-3', '--warmup=50', '--lr_schedule=cosine',
           f'--max_steps={LM_STEPS}', '--eval_interval=100', '--eval_iters=32']
PLATEAU = ['--lr_schedule=constant', '--max_steps=600']   # the plateau diagnostic's runs
LM_PAPER = ['@configs/enwik8_ablation.args', '--attn=full', '--shared_qk=False',
            '--reversible=False']

FULL_SEP = ('full, separate QK', [])
FULL_SHARED = ('full, shared QK', ['--shared_qk=True'])
LSH = lambda r: (f'LSH-{r}', ['--attn=lsh', '--shared_qk=True', f'--n_hashes={r}'])

# full_dot: trained with the authors' full attention (q.k / sqrt(hs), self allowed, raw keys),
# the reference for evaluating every model with it.
TABLE2_VARIANTS = [('full', ['--attn=full'])] + [
    (f'LSH-{r}', ['--attn=lsh', f'--n_hashes={r}']) for r in (1, 2, 4)] + [
    ('full_dot', ['--attn=full_dot'])]

EXPERIMENTS = {
    # How long a run must be to finish: the valid bpc may fall at most ~0.03 over the last 20 %
    # of the steps (experiments.report.MARGIN). One seed of the baseline, three lengths.
    'length': dict(
        title='How many steps the language models need to finish (full attention, one seed)',
        task='text', base=LM_BASE, paper_base=lambda label: LM_PAPER, seeds=[0],
        variants=[(f'{n} steps', [f'--max_steps={n}']) for n in (1200, 2400, 4800)],
        evals=lambda label: [('own', [])]),
    'table2': dict(
        title='Table 2: the duplication task, trained with one attention, evaluated with another',
        task='duplication', base=DUP_BASE, seeds=[0, 1, 2],   # 3: the spread is large
        paper_base=lambda label: [  # full_dot: the full row's file, its --attn replaced
            f"@configs/duplication_{label.lower().replace('-', '').replace('_dot', '')}.args"],
        variants=TABLE2_VARIANTS,
        # The five columns of the paper's table, then the authors' dot-product full attention and
        # each of its three conventions alone (lsh_attention.FULL_KINDS): which one collapses?
        evals=lambda label: [('full', ['--eval_attn=full'])] + [
            (f'LSH-{r}', ['--eval_attn=lsh', f'--eval_n_hashes={r}']) for r in (8, 4, 2, 1)] + [
            (kind, [f'--eval_attn={kind}'])
            for kind in ('full_dot', 'full_scaled', 'full_self', 'full_raw_keys')]),
    # Table 2 nearer the paper's model (1 layer, d_model 256, 4 heads) and sparser: T = 256 with
    # bucket 16, a query sees 32 of 256 keys per round (1/8). Vocab 32 keeps each symbol about 4
    # times in each half (127 / 31), as above. 600 steps: a 2000-step probe of full attention
    # (seed 0) reached 99.2 % at step 300 and stayed there to step 2000, so twice that.
    'table2_sparse': dict(
        title='Table 2 nearer the paper: 1 layer, d_model 256, T 256, bucket 16',
        task='duplication', seeds=[0, 1, 2],
        base=[a for a in DUP_BASE if not a.startswith(('--vocab_size', '--seq_len', '--n_layers',
                                                       '--d_model', '--d_ff', '--max_steps'))]
        + ['--vocab_size=32', '--seq_len=256', '--n_layers=1', '--d_model=256', '--d_ff=256',
           '--max_steps=600'],
        paper_base=lambda label: EXPERIMENTS['table2']['paper_base'](label),
        variants=TABLE2_VARIANTS,
        evals=lambda label: EXPERIMENTS['table2']['evals'](label)),
    'hashes': dict(
        title='Figure 4: LSH attention with 1, 2, 4, 8 hash rounds against full attention',
        task='text', base=LM_BASE, paper_base=lambda label: LM_PAPER, seeds=[0, 1, 2],
        # The suspects for what LSH misses: dedup (without it a key found in k rounds weighs k
        # times), and the previous bytes (a local layer always holds them: the paper's remedy).
        variants=[FULL_SEP, FULL_SHARED, LSH(1), LSH(2), LSH(4), LSH(8)] + [
            (f'LSH-{r}, dedup', LSH(r)[1] + ['--dedup=True']) for r in (2, 4, 8)] + [
            ('local + LSH-4', LSH(4)[1] + ['--attn_pattern=local,lsh'])],
        evals=lambda label: [('own', [])] + ([('LSH-8', ['--eval_n_hashes=8'])]
                                             if label.startswith('LSH') else [])),
    'qk': dict(
        title='Figure 3 left: shared against separate queries and keys (full attention)',
        task='text', base=LM_BASE, paper_base=lambda label: LM_PAPER, seeds=[0, 1, 2],
        # The suspect for what sharing costs: a shared-QK query may not attend to its own key
        # (lsh_attention's convention, for LSH's sake); full_self allows it, all else equal.
        variants=[FULL_SEP, FULL_SHARED, ('full, shared QK, self allowed',
                                          FULL_SHARED[1] + ['--attn=full_self'])],
        evals=lambda label: [('own', [])]),
    'reversible': dict(
        title='Figure 3 right: reversible against ordinary residual layers (full attention), '
              'and the two ways to join the streams',
        task='text', base=LM_BASE, paper_base=lambda label: LM_PAPER, seeds=[0, 1, 2],
        # mean: (x1 + x2) / 2, LayerNorm(C), the tied output layer (the fastai reproduction);
        # concat: [x1, x2], LayerNorm(2C), an untied Linear(2C, V) (trax ReformerLM, Hugging Face)
        variants=[('ordinary', []), ('reversible', ['--reversible=True']),
                  ('reversible, concat', ['--reversible=True', '--rev_join=concat',
                                          '--tie_weights=False'])],
        evals=lambda label: [('own', [])]),
    'depth': dict(
        title="The fastai reproduction (ML Reproducibility Challenge 2020), Section 4.8: 1, 2 and 4 "
              "layers (full attention)",
        task='text', base=LM_BASE, paper_base=lambda label: LM_PAPER, seeds=[0, 1],
        variants=[('1 layer', ['--n_layers=1']), ('2 layers', []), ('4 layers', ['--n_layers=4'])],
        evals=lambda label: [('own', [])]),
    'pattern': dict(
        title="The authors' enwik8 pattern local,local,lsh,local against all-LSH and all-local "
              "(4 layers)",
        task='text', base=LM_BASE, paper_base=lambda label: LM_PAPER, seeds=[0, 1],
        variants=[('local,local,lsh,local', ['--n_layers=4', '--shared_qk=True',
                                             '--attn_pattern=local,local,lsh,local']),
                  ('all LSH', ['--n_layers=4', '--shared_qk=True', '--attn=lsh']),
                  ('all local', ['--n_layers=4', '--shared_qk=True', '--attn=local'])],
        evals=lambda label: [('own', [])]),
    'plateau': dict(
        title='Diagnostic: why LSH leaves the bigram plateau later than full attention',
        task='text', base=LM_BASE, paper_base=lambda label: LM_PAPER, seeds=[0],
        # About the start of a run: the learning rate is constant after warmup, so up to step 400
        # the curves of the 600-step runs and of the 400-step diagnostic ones compare.
        variants=[(label, flags + PLATEAU) for label, flags in [FULL_SHARED, LSH(4)]] + [
            (label, flags + PLATEAU + ['--max_steps=400']) for label, flags in [
                ('LSH-4, sinusoidal', LSH(4)[1] + ['--pos_emb=sinusoidal']),
                ('local, bucket 16', ['--attn=local', '--shared_qk=True']),
                ('LSH-4, bucket 64', LSH(4)[1] + ['--bucket_size=64'])]],
        evals=lambda label: [('own', [])], analyse=True),
}
ORDER = ['length', 'table2', 'table2_sparse', 'hashes', 'qk', 'reversible', 'depth', 'pattern', 'plateau']


def flag_dict(argv):
    """--name=value flags -> {name: value} (later ones win, as in argparse); @FILE kept as is."""
    out = {}
    for a in argv:
        name, _, value = a.lstrip('-').partition('=')
        out[a if a.startswith('@') else name] = value
    return out


def run_key(argv):
    """The out_dir name of a run: a hash of its flags, so equal runs are shared."""
    canon = json.dumps(sorted(flag_dict(argv).items()))
    return hashlib.sha1(canon.encode()).hexdigest()[:12]


def plan(name, seeds=None, paper=False, steps=None, extra=(), only=None):
    """The runs of one experiment: [(label, seed, train flags)]; flags end with --seed.
    only: a list of variant labels to keep (None: all)."""
    exp = EXPERIMENTS[name]
    labels = [label for label, _ in exp['variants']]
    unknown = set(only or ()) - set(labels)
    if unknown:
        raise SystemExit(f"error: --only {sorted(unknown)}: {name} has the variants {labels}")
    runs = []
    for seed in seeds if seeds is not None else exp['seeds']:
        for label, flags in exp['variants']:
            if only and label not in only:
                continue
            base = exp['paper_base'](label) if paper else exp['base']
            argv = list(base) + list(flags) + list(extra)
            if steps:
                argv.append(f'--max_steps={steps}')
            runs.append((label, seed, argv + [f'--seed={seed}']))
    return runs


# ----------------------------------------------------------------------------- running

def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
    except (OSError, StopIteration):
        pass
    import torch
    return {'cpu': cpu, 'cores': os.cpu_count(), 'torch': torch.__version__,
            'python': platform.python_version(), 'threads': os.environ.get('OMP_NUM_THREADS')}


def write_json(path, obj):
    """Through a .tmp file and a rename: a crash leaves the previous file whole."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        json.dump(obj, f, indent=1)
    os.replace(path + '.tmp', path)


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def curve(out_dir):
    """The run's training and eval curves from train.py's log.jsonl. An eval's time_s restarts
    at 0 when a run was resumed; the offset of the earlier part is added back."""
    train, evals, offset, last = [], [], 0.0, 0.0
    for r in read_jsonl(os.path.join(out_dir, 'log.jsonl')):
        if r['kind'] == 'train':
            train.append([r['step'], round(r['loss'], 5)])
        else:
            if r['time_s'] < last:
                offset += last
            last = r['time_s']
            evals.append({k: v for k, v in r.items() if k != 'kind'} | {'time_s': offset + last})
    return {'train': train, 'eval': evals}


def subprocess_train(argv, out_dir, log_name, python=sys.executable):
    """Run train.py with argv (paths relative to the current directory), stdout and stderr
    appended to out_dir/log_name; returns (exit code, seconds)."""
    cmd = [python, os.path.join(ROOT, 'train.py')] + argv
    t0 = time.time()
    with open(os.path.join(out_dir, log_name), 'a') as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    return rc, time.time() - t0


def tail(path, n=600):
    try:
        with open(path, errors='replace') as f:
            text = f.read()
    except OSError:
        return ''
    text = re.sub(r'[^\n]*\r', '', text)   # tqdm's carriage-return progress lines
    return text[-n:]


@contextlib.contextmanager
def locked(path):
    """An exclusive lock on path + '.lock': a second process that wants the same run (or the
    same results file) waits, then finds the first one's work done."""
    import fcntl
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path + '.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def train_run(argv, out_dir, device):
    """Train (or resume, or reuse) one run; returns out_dir/run.json's record."""
    done = os.path.join(out_dir, 'run.json')
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    resume = os.path.exists(os.path.join(out_dir, 'ckpt.pt'))
    full = argv + [f'--out_dir={out_dir}'] + ([f'--device={device}'] if device else [])
    full += ['--resume'] if resume else []
    load_before = os.getloadavg()
    rc, wall = subprocess_train(full, out_dir, 'train.log')
    record = {'command': shlex.join(['python', 'train.py'] + full), 'rc': rc,
              'status': 'ok' if rc == 0 else 'failed', 'wall_s': round(wall, 1),
              'resumed': resume, 'load_before': [round(x, 2) for x in load_before],
              'load_after': [round(x, 2) for x in os.getloadavg()]}
    with open(os.path.join(out_dir, 'train.log'), errors='replace') as f:
        found = re.findall(r'^device: ([^,\s]+)', f.read(), re.M)   # train.py's start-up line
    if found:
        record['device'] = found[-1]
    if rc != 0:
        record['error'] = tail(os.path.join(out_dir, 'train.log'))
    write_json(done, record)
    return record


def eval_run(argv, out_dir, device, eval_flags):
    """train.py --eval_only on the whole valid split with eval_flags; the metrics, cached in
    out_dir/evals.json by the flags."""
    cache_path = os.path.join(out_dir, 'evals.json')
    cache = json.load(open(cache_path)) if os.path.exists(cache_path) else {}
    key = ' '.join(eval_flags) or 'own'
    if key not in cache:
        before = len(read_jsonl(os.path.join(out_dir, 'eval_only.jsonl')))
        full = argv + [f'--out_dir={out_dir}', '--eval_only'] + eval_flags
        full += [f'--device={device}'] if device else []
        rc, wall = subprocess_train(full, out_dir, 'eval.log')
        lines = read_jsonl(os.path.join(out_dir, 'eval_only.jsonl'))
        if rc != 0 or len(lines) <= before:
            return {'status': 'failed', 'error': tail(os.path.join(out_dir, 'eval.log'))}
        cache[key] = lines[-1] | {'wall_s': round(wall, 1)}
        write_json(cache_path, cache)
    return cache[key]


def save_run(path, header, run):
    """Add (or replace) one run in results/NAME.json under a lock, keeping the runs other
    processes wrote (seeds may run in parallel: `--seeds 0` and `--seeds 1`); returns the file's
    new contents. Runs are kept in (seed, variant) order."""
    with locked(path):
        runs = []
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            if old.get('scale') == header['scale']:
                # each run keeps the machine it ran on (older files held it in the header only)
                runs = [dict(r, machine=r.get('machine', old.get('machine')))
                        for r in old['runs'] if (r['label'], r['seed']) !=
                        (run['label'], run['seed'])]
        order = [label for label, _ in EXPERIMENTS[header['experiment']]['variants']]
        rank = lambda r: (r['seed'], order.index(r['label']) if r['label'] in order else 99)
        out = dict(header, runs=sorted(runs + [run], key=rank))
        write_json(path, out)
    return out


def recorded(path, label, seed, argv, eval_labels):
    """The run of results/NAME.json with this label, seed and flags, if it finished and has
    every eval: what a new checkout (without out/) need not train again. None otherwise."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        runs = json.load(f)['runs']
    return next((r for r in runs if (r['label'], r['seed']) == (label, seed) and
                 finished(r, argv, eval_labels)), None)


def finished(run, argv, eval_labels):
    """Whether a recorded run trained these flags to the end and has every eval in eval_labels."""
    return (run['config'] == flag_dict(argv) and run['status'] == 'ok' and
            all(e in run['evals'] and 'status' not in run['evals'][e] for e in eval_labels))


def recorded_elsewhere(results, name, label, argv, scale):
    """(experiment, run) of another experiment's results/*.json that trained these very flags and
    evaluated them as this one would (every eval label of `label` with the same flags), e.g.
    reversible's 'ordinary' is hashes' 'full, separate QK': one training serves both. None if
    there is no such run."""
    evals = dict(EXPERIMENTS[name]['evals'](label))
    for other in EXPERIMENTS:
        path = os.path.join(results, f'{other}.json')
        if other == name or not os.path.exists(path):
            continue
        with open(path) as f:
            r = json.load(f)
        if r.get('scale') != scale:
            continue
        for run in r['runs']:
            theirs = dict(EXPERIMENTS[other]['evals'](run['label']))
            if finished(run, argv, evals) and all(theirs.get(e) == flags
                                                  for e, flags in evals.items()):
                return other, run
    return None


def final_metric(task):
    return 'accuracy' if task == 'duplication' else 'bpc'


def run_experiment(name, seeds=None, paper=False, steps=None, device=None, root='out/reproduce',
                   results='experiments/results', extra=(), only=None):
    """Run (or continue) every run of an experiment; writes results/NAME.json after each."""
    exp = EXPERIMENTS[name]
    if exp['task'] == 'text' and not paper:
        prepare_corpus()
    path = os.path.join(results, f'{name}.json')
    out = {'experiment': name, 'title': exp['title'], 'task': exp['task'],
           'scale': 'paper' if paper else 'cpu', 'machine': machine(), 'runs': []}
    if exp['task'] == 'text' and not paper:
        out['corpus'] = corpus_info(CORPUS)
    if exp.get('analyse') and not paper:   # before any training: cheap, cached in out_root
        cache = os.path.join(root, 'untrained_windows.json')
        if not os.path.exists(cache):
            write_json(cache, untrained_windows())
        with open(cache) as f:
            out['untrained_windows'] = json.load(f)
    for label, seed, argv in plan(name, seeds, paper, steps, extra, only):
        out_dir = os.path.join(root, run_key(argv))
        kept = recorded(path, label, seed, argv, [e for e, _ in exp['evals'](label)])
        if kept and not os.path.exists(out_dir):   # a new checkout: out/ is not in git
            print(f"[{name}] {label}, seed {seed}: done, in {path}", flush=True)
            continue
        shared = None if kept else recorded_elsewhere(results, name, label, argv, out['scale'])
        if shared:   # the same training, already run and evaluated for another experiment
            other, run = shared
            out = save_run(path, out, dict(run, label=label, seed=seed, shared_with=other))
            print(f"[{name}] {label}, seed {seed}: done, as {other}'s {run['label']!r}", flush=True)
            continue
        print(f"[{name}] {label}, seed {seed}: {out_dir}", flush=True)
        with locked(os.path.join(out_dir, 'run')):   # the run, its evals and analysis
            record = train_run(argv, out_dir, device)
            run = {'label': label, 'seed': seed, 'config': flag_dict(argv), 'out_dir': out_dir,
                   'device': device or 'auto', 'machine': out['machine'], **record,
                   'curve': curve(out_dir), 'evals': {}}
            if record['status'] == 'ok':
                for eval_label, flags in exp['evals'](label):
                    run['evals'][eval_label] = eval_run(argv, out_dir, device, flags)
                if exp.get('analyse'):
                    run['windows'] = analyse_windows(out_dir)
        out = save_run(path, out, run)
        print(f"[{name}] {label}, seed {seed}: {record['status']}, {record['wall_s']} s, "
              + ', '.join(f"{k} {v.get(final_metric(exp['task']), v.get('status'))}"
                          for k, v in run['evals'].items()), flush=True)
    plot(out, os.path.join(results, f'{name}.png'))
    return out


# ----------------------------------------------------------------------------- the plateau
# Why do LSH models leave the bigram plateau late? A diagnostic on a trained (or untrained)
# checkpoint: for each layer, how much of the attention that *full* attention with the same shared
# query/key vectors would pay falls inside the keys that LSH-R lets a query see, and how often the
# previous token is among them (a bigram model becomes a trigram model through that key).

def window_stats(model, x, n_hashes, bucket_size, seed=0):
    """Per layer of a non-reversible shared-QK model on tokens x (B, T): the mean over queries of
    {'mass_in_window': sum of full attention's weights on keys in the query's LSH windows,
     'prev_in_window': 1 if key i-1 is in them, 'prev_mass': full attention's weight on i-1}."""
    import torch
    from lsh_attention import hash_vectors
    torch.manual_seed(seed)
    with torch.no_grad():
        return _window_stats(model, x, n_hashes, bucket_size, hash_vectors)


def _window_stats(model, x, n_hashes, bucket_size, hash_vectors):
    import torch
    B, T = x.shape
    m, nb = bucket_size, T // bucket_size
    h = model.tok_emb(x) + model.pos_emb(T)                                   # (B, T, C)
    pos = torch.arange(T)
    earlier = pos[None, :] < pos[:, None]                                     # (T, T) j < i
    out = []
    for layer in model.layers:
        att = layer.f.attn
        nh, hs = att.n_heads, att.hs
        qk = att.qk(layer.f.ln(h)).view(B, T, nh, hs).transpose(1, 2).reshape(B * nh, T, hs)
        k_hat = torch.nn.functional.normalize(qk, dim=-1)
        logits = (qk @ k_hat.transpose(1, 2)).masked_fill(~earlier, float('-inf'))
        p = torch.softmax(logits[:, 1:], dim=-1)                              # (B nh, T-1, T)
        buckets = hash_vectors(qk, nb, n_hashes)                              # (B nh, R, T)
        slot = (buckets * T + pos).argsort(-1).argsort(-1)                    # position -> slot
        chunk = slot // m                                                     # (B nh, R, T)
        seen = torch.zeros(B * nh, T, T, dtype=torch.bool)
        for r in range(n_hashes):   # key j is seen in round r if its chunk is i's or the one before
            d = (chunk[:, r, :, None] - chunk[:, r, None, :]) % nb            # (B nh, T, T)
            seen |= (d == 0) | (d == 1)
        seen = seen[:, 1:]                                                    # (B nh, T-1, T)
        prev = seen.gather(-1, pos[:-1].expand(B * nh, -1)[..., None])[..., 0]
        out.append({'mass_in_window': float((p * seen).sum(-1).mean()),
                    'prev_in_window': float(prev.float().mean()),
                    'prev_mass': float(p.gather(-1, pos[:-1].expand(B * nh, -1)[..., None])
                                       .mean())})
        h = layer(h)
    return out


def untrained_windows(seq_lens=(128, 256, 512, 1024), hashes=(1, 2, 4, 8),
                      pos_embs=('axial', 'sinusoidal'), n_seqs=4, seed=0, base=LM_BASE):
    """window_stats of the untrained `base` model (shared QK) at several lengths: how local the
    LSH windows are before any training. [{T, pos_emb, LSH-R: per-layer stats}]"""
    import torch
    from data import ByteStream, prepare_dataset
    from model import ModelConfig, ReformerLM
    base = train_args(list(base) + ['--shared_qk=True'])
    out = []
    for T in seq_lens:
        paths = prepare_dataset('text', base.data_dir, base.data_path, 'byte', T)
        x, _ = ByteStream(paths['valid'], T, seed=1234).batch(n_seqs)
        for pos_emb in pos_embs:
            torch.manual_seed(seed)
            config = ModelConfig(**{**model_fields(base), 'max_seq_len': T, 'pos_emb': pos_emb})
            model = ReformerLM(config).eval()
            out.append({'T': T, 'pos_emb': pos_emb, **{
                f'LSH-{r}': window_stats(model, x, r, config.bucket_size) for r in hashes}})
    return out


def train_args(argv):
    import train
    return train.parse_args(argv)


def model_fields(args):
    import dataclasses
    from model import ModelConfig
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(ModelConfig)}


def analyse_windows(out_dir, hashes=(1, 4, 8), n_seqs=8):
    """window_stats of a run's final checkpoint and of the same model untrained, on n_seqs
    valid windows; cached in out_dir/windows.json. None for models without shared QK or with
    reversible layers (the analysis follows the ordinary residual stream)."""
    path = os.path.join(out_dir, 'windows.json')
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    import torch
    from data import ByteStream, prepare_dataset
    from model import ModelConfig, ReformerLM
    ckpt = torch.load(os.path.join(out_dir, 'ckpt.pt'), map_location='cpu', weights_only=False)
    config = ModelConfig(**ckpt['model_args'])
    if not config.shared_qk or config.reversible:
        return None
    a = ckpt['args']
    paths = prepare_dataset(a['dataset'], a['data_dir'], a['data_path'], a['enwik8_split'],
                            a['seq_len'])
    x, _ = ByteStream(paths['valid'], a['seq_len'], seed=1234).batch(n_seqs)
    torch.manual_seed(a['seed'])
    models = {'untrained': ReformerLM(config), 'trained': ReformerLM(config)}
    models['trained'].load_state_dict(ckpt['model'])
    out = {name: {f'LSH-{r}': window_stats(mdl.eval(), x, r, config.bucket_size)
                  for r in hashes} for name, mdl in models.items()}
    write_json(path, out)
    return out


# ----------------------------------------------------------------------------- plots

def plot(result, png):
    """The valid metric of every run against steps (left) and wall time (right)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    metric = final_metric(result['task'])
    labels = list(dict.fromkeys(r['label'] for r in result['runs']))
    colors = {l: plt.cm.tab10(i % 10) for i, l in enumerate(labels)}
    styles = ['-', '--', ':', '-.']
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for r in result['runs']:
        ev = [e for e in r['curve']['eval'] if metric in e]
        if not ev:
            continue
        style = styles[r['seed'] % len(styles)]
        name = f"{r['label']} (seed {r['seed']})"
        for ax, x in zip(axes, ('step', 'time_s')):
            ax.plot([e[x] for e in ev], [e[metric] for e in ev], style, color=colors[r['label']],
                    label=name)
    axes[0].set(xlabel='step', ylabel=f'valid {metric} (train-time eval)')
    fig.suptitle(result['title'], fontsize=10)
    axes[1].set(xlabel='wall time (s, this machine, shared)')
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------ the bare translation run
# What a new user with a small corpus gets from `python train.py --dataset=parallel
# --data_path=FILE` and nothing else (configs/parallel_small.args), timed end to end, then scored
# on the test part with beam search: the promise that it finishes in about an hour on 2 cores
# with a usable result, measured. The corpus: the 30,919 English-Spanish verse pairs of
# `python -m translation.translation_data --dataset=bible` (about the size of corpus that recipe
# is for, and the largest one Debian or PyPI ships).

PARALLEL_DATA = os.path.join('data', 'bible_en_es.tsv')


def trained(argv, out_dir):
    """train_run for a translation run that the rest needs: its record, or a clear error."""
    record = train_run(argv, out_dir, None)
    if record['status'] != 'ok':
        raise SystemExit(f"error: the run failed; see {out_dir}/train.log:\n"
                         f"{record.get('error')}")
    return record


def score_test_part(out_dir, checkpoint, name):
    """translate.py --eval of out_dir's checkpoint (best, last, avg) on the test part: sacreBLEU,
    chrF and the rest, with its wall time; cached in out_dir/name (a later call reads it)."""
    from translation import translate
    cached = os.path.join(out_dir, name)
    if not os.path.exists(cached):
        t0 = time.time()
        with open(os.path.join(out_dir, 'translate.log'), 'a') as log, \
                contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            test = translate.main([f'--out_dir={out_dir}', '--eval', f'--checkpoint={checkpoint}'])
        write_json(cached, {k: v for k, v in test.items() if k != 'hypotheses'} |
                   {'eval_wall_s': round(time.time() - t0, 1)})
    with open(cached) as f:
        return json.load(f)


def parallel_small(data_path=PARALLEL_DATA, root='out/reproduce', results='experiments/results',
                   extra=()):
    """Train the bare --dataset=parallel command (resumable; a finished run is not redone),
    score ckpt_best.pt on the test part (translate --eval: beam 4, sacreBLEU and chrF), and write
    results/parallel_small.json. Returns its contents. extra: more train.py flags (tests)."""
    if not os.path.exists(data_path):
        raise SystemExit(f"error: {data_path} not found; make it with `python -m "
                         f"translation.translation_data --dataset=bible --data_dir="
                         f"{os.path.dirname(data_path) or '.'}`")
    out_dir = os.path.join(root, 'parallel_small')
    argv = ['--dataset=parallel', f'--data_path={data_path}', *extra]
    with locked(os.path.join(out_dir, 'run')):
        record = trained(argv, out_dir)
        test = score_test_part(out_dir, 'best', 'eval_test.json')
    lines = read_jsonl(os.path.join(out_dir, 'log.jsonl'))
    evals = [r for r in lines if r['kind'] not in ('train', 'final')]
    with open(data_path, 'rb') as f:
        data = f.read()
    out = {'experiment': 'parallel_small', 'title': 'The bare --dataset=parallel command, timed '
           'end to end', 'machine': machine(), 'command': shlex.join(['python', 'train.py'] + argv),
           'data': {'path': data_path, 'pairs': data.count(b'\n'), 'bytes': len(data),
                    'md5': hashlib.md5(data).hexdigest()},
           'train': record, 'steps': max((r['step'] for r in lines), default=0),
           'curve': {'train': [[r['step'], round(r['loss'], 4)] for r in lines
                               if r['kind'] == 'train'],
                     'eval': [{k: r[k] for k in ('step', 'loss', 'nll', 'ppl', 'time_s') if k in r}
                              for r in evals]},
           'best': min(({'step': r['step'], 'nll': r['nll'], 'ppl': r['ppl']} for r in evals
                        if 'nll' in r), key=lambda r: r['nll'], default=None),
           'final': next((r for r in reversed(lines) if r['kind'] == 'final'), None),
           'test': {k: v for k, v in test.items() if k != 'hypotheses'},
           'translate_command': f"python -m translation.translate --out_dir={out_dir} --eval"}
    write_json(os.path.join(results, 'parallel_small.json'), out)
    return out


# Checkpoint averaging (train.py --average_last): does the parameter mean of the last evals
# translate better than the best or the last single checkpoint? parallel_small's run continued
# from its step 1,200, late in the rsqrt decay, with an eval every 100 steps; then each of the
# three checkpoints scored on the test part (translate --eval) and on the whole valid part
# (train.py --eval_only: the unsmoothed NLL).
AVERAGING = ['--max_steps=1600', '--eval_interval=100', '--average_last=4']   # + --resume


def averaging(data_path=PARALLEL_DATA, root='out/reproduce', results='experiments/results',
              extra=(), flags=AVERAGING):
    """Continue parallel_small's finished run in a copy (out_root/averaging) with flags, score
    ckpt.pt, ckpt_best.pt and ckpt_avg.pt, and write results/averaging.json. Resumable: the
    continued run and every score are kept in the copy. extra: as parallel_small's (tests)."""
    import shutil
    src = os.path.join(root, 'parallel_small')
    if not os.path.exists(os.path.join(src, 'run.json')):
        raise SystemExit(f"error: no finished run in {src}; run `python -m experiments.reproduce "
                         f"parallel_small` first")
    out_dir = os.path.join(root, 'averaging')
    if not os.path.exists(out_dir):
        shutil.copytree(src, out_dir + '.part', ignore=shutil.ignore_patterns(
            'run.json', 'eval_*.json', 'evals.json', '*.lock'))
        os.replace(out_dir + '.part', out_dir)
    base = ['--dataset=parallel', f'--data_path={data_path}', *extra]
    argv = base + list(flags)
    with locked(os.path.join(out_dir, 'run')):
        record = trained(argv, out_dir)
        scores = {}
        for kind in ('last', 'best', 'avg'):
            valid = eval_run(base, out_dir, None, [f'--eval_checkpoint={kind}'])
            test = score_test_part(out_dir, kind, f'test_{kind}.json')
            scores[kind] = {'step': test['step'], 'averaged_steps': test.get('averaged_steps'),
                            'valid_nll': valid.get('nll'), 'valid_ppl': valid.get('ppl'),
                            'bleu': test['bleu'], 'chrf': test['chrf'],
                            'bleu_signature': test['bleu_signature'],
                            'n_sentences': test['n_sentences'], 'beam_size': test['beam_size']}
    lines = read_jsonl(os.path.join(out_dir, 'log.jsonl'))
    out = {'experiment': 'averaging', 'title': 'Checkpoint averaging on the bare translation run',
           'machine': machine(), 'command': shlex.join(['python', 'train.py'] + argv),
           'continued_from': src, 'train': record,
           'evals': [{k: r[k] for k in ('step', 'nll', 'ppl') if k in r} for r in lines
                     if r['kind'] == 'eval'],
           'checkpoints': scores}
    write_json(os.path.join(results, 'averaging.json'), out)
    return out


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('name', choices=ORDER + ['all', 'corpus', 'parallel_small', 'averaging'],
                   help='the experiment to run, all of them, corpus, parallel_small (the bare '
                        'translation command, timed) or averaging (its checkpoints averaged)')
    p.add_argument('--seeds', default=None,
                   help="comma-separated seeds; default: the experiment's (2 or 3)")
    p.add_argument('--paper', action='store_true',
                   help="the paper's sizes (configs/*.args) instead of the CPU scale: for a GPU")
    p.add_argument('--max_steps', type=int, default=None, help='override every run\'s steps')
    p.add_argument('--device', default=None, help="train.py --device (default: train.py's)")
    p.add_argument('--out_root', default='out/reproduce', help='the runs\' out_dirs go here')
    p.add_argument('--results', default='experiments/results', help='results/NAME.json and NAME.png go here')
    p.add_argument('--corpus_sources', default=CORPUS_SOURCES,
                   help='the folder(s) of .rst.txt files for `corpus` (a glob)')
    p.add_argument('--extra', default='', help="extra train.py flags for every run, e.g. "
                                              "'--eval_iters=2' (they change the run hashes)")
    p.add_argument('--only', action='append', default=None, metavar='LABEL',
                   help="run only this variant (repeatable), e.g. --only LSH-8 --only LSH-4")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(',')] if a.seeds else None
    if a.name == 'corpus':
        return prepare_corpus(sources=a.corpus_sources)
    if a.name == 'parallel_small':
        return parallel_small(root=a.out_root, results=a.results)
    if a.name == 'averaging':
        return averaging(root=a.out_root, results=a.results)
    for name in ORDER if a.name == 'all' else [a.name]:
        run_experiment(name, seeds, a.paper, a.max_steps, a.device, a.out_root, a.results,
                       shlex.split(a.extra), a.only)
    return None


if __name__ == '__main__':
    main()
