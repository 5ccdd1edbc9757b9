"""
The reproduction's report, generated from experiments/results/*.json and
experiments/bench_results/*.json: experiments/RESULTS.md (every experiment: its data and scale,
tables, plots, runs, machine and load) and, between markers in the root README.md, a table of
the verdicts and a benchmark summary. Every number and every claim in the generated text is
computed from those files; a rerun that changes a number changes every sentence that states it.

    python -m experiments.report                 # after any experiment (experiments.reproduce)

The paper's numbers (Table 2) and the fastai reproduction's (ML Reproducibility Challenge 2020)
are reference constants below, marked so; docs/sources.md says where they come from.
"""
import argparse
import functools
import glob
import json
import math
import os
import textwrap

from experiments.reproduce import EXPERIMENTS, LM_STEPS, ORDER, plan, plot

MARK_START, MARK_END = '<!-- results:start -->', '<!-- results:end -->'
BENCH_START, BENCH_END = '<!-- bench:start -->', '<!-- bench:end -->'


# ----------------------------------------------------------------------------- summaries

def mean_spread(values):
    """'mean ± half the range (n)' of a list of numbers; '-' for none."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return sum(values) / len(values), (max(values) - min(values)) / 2


def cell(values, percent=False):
    mean, spread = mean_spread(values)
    if mean is None:
        return '-'
    k = 100 if percent else 1
    fmt = '{:.1f}' if percent else '{:.3f}'
    s = fmt.format(k * mean)
    if len(values) > 1:
        s += ' ± ' + fmt.format(k * spread)
    return s


def by_label(result):
    """{label: [runs]} in variant order."""
    out = {}
    for r in result['runs']:
        out.setdefault(r['label'], []).append(r)
    return out


def eval_values(runs, eval_label, metric):
    return [r['evals'].get(eval_label, {}).get(metric) for r in runs if r['status'] == 'ok']


def leave_step(run, threshold):
    """The step at which the valid bpc first falls below threshold, interpolated linearly
    between the two evals around it (None: never): leaving the plateau."""
    ev = [(e['step'], e['bpc']) for e in run['curve']['eval'] if 'bpc' in e]
    for (s0, b0), (s1, b1) in zip([(0, float('inf'))] + ev, ev):
        if b1 < threshold:
            return s1 if not math.isfinite(b0) else round(s0 + (b0 - threshold) / (b0 - b1) * (s1 - s0))
    return None


# ----------------------------------------------------------------------------- the README section
# Everything below turns results/*.json into Markdown; no number in it is typed by hand. The
# paper's numbers (the Reformer paper, Table 2) and the fastai reproduction's (ML Reproducibility
# Challenge 2020, arampacha/reformer_fastai) are reference constants, marked so.

PAPER_TABLE2 = {'full': [100, 94.8, 92.5, 76.9, 52.5], 'LSH-4': [0.8, 100, 99.9, 99.4, 91.9],
                'LSH-2': [0.8, 100, 99.9, 98.1, 86.8], 'LSH-1': [0.8, 99.9, 99.6, 94.8, 77.9]}
# The fastai reproduction's enwik8 results (3 layers, length 4096): LSH trained with 4 hashes,
# test bpc evaluated with 2 and with 8 hashes; its gap between reversible and ordinary layers.
FASTAI_LSH4_BPC = {2: 1.46, 8: 1.45}
FASTAI_REVERSIBLE_GAP = 0.11
FASTAI_TABLE2 = {'full': [100, 1.37, 1.85, 3.00, 4.56], 'LSH-4': [46.54, 99.71, 99.77, 93.05, 77.62],
               'LSH-2': [75.94, 96.60, 97.45, 97.08, 86.06],
               'LSH-1': [70.65, 76.61, 79.68, 79.34, 56.09]}
TABLE2_EVALS = ['full', 'LSH-8', 'LSH-4', 'LSH-2', 'LSH-1']
# The authors' dot-product full attention, and each of its three conventions alone
# (lsh_attention.FULL_KINDS): the paper's table has no such columns.
TABLE2_DOT = ['full_dot', 'full_scaled', 'full_self', 'full_raw_keys']
# What the paper ran each claim on (docs/sources.md), beside our data and scale.
PAPER_DATA = {'table2': 'duplication, vocab 128, T 1024, 1 layer, d 256',
              'hashes': 'imagenet64', 'qk': 'enwik8 and imagenet64',
              'reversible': 'enwik8 and imagenet64'}
PLATEAU_BPC = 3.0   # below this a model has left the bigram plateau (~3.35 bpc on this corpus)


def command(name):
    return f"python -m experiments.reproduce {name}"


def load_results(results='experiments/results'):
    """This module's experiments in results/ (other tools write there too: translation.json)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(results, '*.json'))):
        with open(path) as f:
            r = json.load(f)
        if isinstance(r, dict) and r.get('experiment') in EXPERIMENTS:
            out[r['experiment']] = r
    return out


def machines_text(result):
    """'CPU, 2 cores, torch X, OMP_NUM_THREADS=1' of the machine(s) the runs ran on, each with
    its runs' count when they differ (a run's own 'machine', else the file's)."""
    text = lambda m: (f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
                      f"OMP_NUM_THREADS={m['threads']}")
    seen = {}
    for r in result['runs']:
        t = text(r.get('machine') or result['machine'])
        seen[t] = seen.get(t, 0) + 1
    if len(seen) <= 1:
        return next(iter(seen), text(result['machine']))
    return ' and '.join(f"{t} ({n} run{'s' if n > 1 else ''})" for t, n in seen.items())


def recipe_text(c):
    """'steps of B x T tokens, lr (schedule), train-time evals on N fixed batches' of one run's
    flags."""
    sched = {'cosine': 'cosine decay to 10 %'}.get(c.get('lr_schedule'),
                                                    c.get('lr_schedule', 'constant'))
    evals = ''
    if c.get('eval_iters') and c.get('batch_size') and c.get('seq_len'):
        n = int(c['eval_iters']) * int(c['batch_size']) * int(c['seq_len'])
        evals = f", train-time evals on {c['eval_iters']} fixed batches ({n:,} tokens)"
    return (f"steps of {c.get('batch_size')} x {c.get('seq_len')} tokens, lr {c.get('lr')} "
            f"({sched} after {c.get('warmup')} warmup steps){evals}")


def runs_line(result):
    """How many runs, how many failed, the seeds, the recipe(s), the machine and its load. A file
    part-way through a rerun under a new recipe holds both: each is named with its runs' count."""
    runs = result['runs']
    failed = [f"{r['label']} seed {r['seed']}" for r in runs if r['status'] != 'ok']
    loads = [r['load_before'][0] for r in runs] + [r['load_after'][0] for r in runs]
    noisy = max(loads) > result['machine']['cores']
    recipes = {}
    for r in runs:
        t = recipe_text(r['config'])
        recipes.setdefault(t, []).append(r['config'].get('max_steps'))
    recipe = '; '.join(t if len(recipes) == 1 else f"{t} ({len(n)} run{'s' if len(n) > 1 else ''}"
                       f", {', '.join(sorted(set(n)))} steps)" for t, n in recipes.items())
    return (f"{len(runs)} run(s), seeds {sorted({r['seed'] for r in runs})}, {recipe}, "
            f"{len(failed)} failed{(' (' + ', '.join(failed) + ')') if failed else ''}; "
            f"{machines_text(result)}; "
            f"1-minute load average {min(loads):.1f}-{max(loads):.1f} during the runs"
            f"{' (above the core count: other jobs shared the machine, so wall times are noisy)' if noisy else ''}.")


def table2_section(result):
    groups = by_label(result)
    cols = TABLE2_EVALS + TABLE2_DOT
    lines = ['| trained \\ evaluated | ' + ' | '.join(cols) + ' |', '|---' * (len(cols) + 1) + '|']
    for label, runs in groups.items():
        cells = [cell(eval_values(runs, e, 'accuracy'), percent=True) for e in cols]
        lines.append(f'| **{label}** (ours) | ' + ' | '.join(cells) + ' |')
        for name, table in (('paper', PAPER_TABLE2), ('fastai', FASTAI_TABLE2)):
            if label in table:
                lines.append(f'| {label} ({name}) | ' + ' | '.join(f'{v:g}' for v in table[label])
                             + ' |' * (len(TABLE2_DOT) + 1))
    return lines


def data_scale(result):
    """Our data and model size, from the runs' flags: what a verdict stands on."""
    c = next((r['config'] for r in result['runs'] if r.get('config')), {})
    steps = sorted({int(r['config']['max_steps']) for r in result['runs']
                    if r.get('config', {}).get('max_steps')})
    size = (f"{c.get('n_layers')} layers, d {c.get('d_model')}, T {c.get('seq_len')}, "
            f"{' or '.join(map(str, steps)) or '?'} steps")
    if result['task'] == 'duplication':
        return f"duplication, vocab {c.get('vocab_size')}; {size}"
    mb = result.get('corpus', {}).get('bytes', 0) / 1e6
    return f"text (Python docs, {mb:.1f} MB); {size}"


def bpc_at(run, step):
    """The valid bpc (the --eval_iters batches of training's evals) at `step`, or None."""
    return next((e['bpc'] for e in run['curve']['eval'] if e['step'] == step), None)


def lm_section(result, lsh8=False, at_step=None):
    head = (['model', 'steps', 'valid bpc'] + (['with LSH-8'] if lsh8 else []) +
            ([f'bpc at step {at_step} (train-time eval)'] if at_step else []) +
            [f'leaves {PLATEAU_BPC} bpc at step', 'bpc fell over the last 20 %',
             'training time (s)'])
    lines = ['| ' + ' | '.join(head) + ' |', '|---' * len(head) + '|']
    for label, runs in by_label(result).items():
        ok = [r for r in runs if r['status'] == 'ok']
        steps = sorted({r['config'].get('max_steps') for r in runs})
        row = [label, ', '.join(steps), cell(eval_values(runs, 'own', 'bpc'))]
        if lsh8:
            row.append(cell(eval_values(runs, 'LSH-8', 'bpc')) if label.startswith('LSH') else '')
        if at_step:
            row.append(cell([bpc_at(r, at_step) for r in ok]))
        steps = [leave_step(r, PLATEAU_BPC) for r in ok]
        row.append(', '.join('never' if s is None else str(s) for s in steps) or '-')
        drops = [last_fifth_drop(r) for r in ok]
        row.append(', '.join('-' if d is None else f'{d:.3f}' for d in drops) or '-')
        # training time from the curve (added up over a resume), not the subprocess's wall_s
        row.append(', '.join(f"{r['curve']['eval'][-1]['time_s']:.0f}" for r in ok
                             if r['curve']['eval']) or '-')
        lines.append('| ' + ' | '.join(row) + ' |')
    return lines


def windows_section(result):
    """The window analysis of each analysed run: per layer, the share of full attention's
    weight that LSH-R's windows hold, how often they hold the previous token, and the weight
    full attention gives the previous token."""
    lines = ['Full attention with the model\'s own shared QK vectors, against the keys LSH-R '
             'lets each query see (8 valid sequences; per layer: weight in the windows / previous '
             'token in the windows / weight on the previous token):', '',
             '| model | weights | windows of | layer 1 | layer 2 |', '|---|---|---|---|---|']
    shown_untrained = False
    for r in result['runs']:
        for state, per_r in (r.get('windows') or {}).items():
            if state == 'untrained' and shown_untrained:
                continue   # the same initial weights for every run of one seed
            shown_untrained |= state == 'untrained'
            for rounds, layers in per_r.items():
                cells = [f"{l['mass_in_window']:.2f} / {l['prev_in_window']:.2f} / "
                         f"{l['prev_mass']:.2f}" for l in layers[:2]]
                lines.append(f"| {r['label']} (seed {r['seed']}) | {state} | {rounds} | "
                             + ' | '.join(cells) + ' |')
    return lines


def untrained_section(result):
    rows = result.get('untrained_windows') or []
    if not rows:
        return []
    hashes = [k for k in rows[0] if k.startswith('LSH')]
    lines = ['Before any training (the same model, untrained, bucket 16, layer 1): how often the '
             "previous token is in a query's LSH windows, and full attention's weight in them:", '',
             '| T | positions | ' + ' | '.join(hashes) + ' |', '|---' * (len(hashes) + 2) + '|']
    for r in rows:
        lines.append(f"| {r['T']} | {r['pos_emb']} | " + ' | '.join(
            f"{r[h][0]['prev_in_window']:.2f} / {r[h][0]['mass_in_window']:.2f}" for h in hashes)
            + ' |')
    return lines + ['']


def mean_of(result, label, eval_label='own', metric='bpc', seeds=None):
    runs = [r for r in by_label(result).get(label, []) if seeds is None or r['seed'] in seeds]
    return mean_spread(eval_values(runs, eval_label, metric))


def seeds_note(seeds):
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, sorted(seeds)))}"


# ----------------------------------------------------------------------------- verdicts
# A verdict compares runs that have finished learning, on paired seeds (the same seed: the same
# batches and, where the shapes agree, the same initial weights), with a 95 % interval.

MARGIN = 0.03        # bpc: what 'does not hurt' allows, and what 'finished' allows in the last 20 %
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262}   # Student's t, 97.5 % quantile, by degrees of freedom (n seeds - 1)
PAIRED_RULE = (f"Rule: the per-seed differences (same seed, same batches) give a mean and a 95 % "
               f"interval (Student's t, n - 1 degrees of freedom); 'does not hurt' holds when the "
               f"whole interval lies below +{MARGIN} bpc, does not hold when it lies above, and "
               f"is not settled otherwise, or with one seed, or while a compared run is still "
               f"learning (its valid bpc fell by more than {MARGIN} over its last 20 % of steps).")


def last_fifth_drop(run):
    """How much the train-time valid bpc fell over the run's last 20 % of steps (None: no eval
    at or before 80 % of the final step): from its value at 80 % of the final step (linear
    between the evals around it, bpc_at_fraction) to the final eval's."""
    then = bpc_at_fraction(run, 0.8)
    return None if then is None else then - run['curve']['eval'][-1]['bpc']


def bpc_at_fraction(run, frac):
    """The train-time valid bpc at frac of the run's final step, linear between the evals
    around it (None: fewer than two evals, or none that early)."""
    ev = [(e['step'], e['bpc']) for e in run['curve']['eval'] if 'bpc' in e]
    if len(ev) < 2 or ev[0][0] > frac * ev[-1][0]:
        return None
    at = frac * ev[-1][0]
    (s0, b0), (s1, b1) = next((p, q) for p, q in zip(ev, ev[1:]) if p[0] <= at <= q[0])
    return b0 + (b1 - b0) * (at - s0) / (s1 - s0)


def still_learning(result, labels, seeds=None):
    """'' if every finished run of labels has flattened (its bpc fell by at most MARGIN over its
    last 20 % of steps), else a phrase saying how many have not, and by how much they fell."""
    runs = [r for l in labels for r in by_label(result).get(l, []) if r['status'] == 'ok'
            and (seeds is None or r['seed'] in seeds)]
    drops = [last_fifth_drop(r) for r in runs]
    learning = [d for d in drops if d is None or d > MARGIN]
    if not learning:
        return ''
    known = [d for d in learning if d is not None]
    fell = (f", falling {min(known):.3f}-{max(known):.3f} bpc over the last 20 % of steps"
            if known else '')
    return f"{len(learning)} of {len(runs)} runs still learning at the end{fell}"


# A pair compares two runs of one recipe: these flags must agree (a rerun with a new recipe
# replaces its runs one by one, and until all are redone the results file holds both).
RECIPE = ('max_steps', 'lr', 'lr_schedule', 'warmup', 'batch_size', 'seq_len', 'eval_iters')


def paired_difference(result, base, other, eval_label='own', metric='bpc'):
    """other - base per seed, over the seeds both finished with the same RECIPE: {'seeds',
    'diffs', 'mean', 'lo', 'hi'} (lo and hi: the 95 % t interval; None with one seed), or None
    without a pair."""
    runs = lambda label: {r['seed']: r for r in by_label(result).get(label, [])
                          if r['status'] == 'ok'}
    rb, ro = runs(base), runs(other)
    value = lambda r: r['evals'].get(eval_label, {}).get(metric)
    same = lambda x, y: all(x['config'].get(k) == y['config'].get(k) for k in RECIPE)
    seeds = sorted(s for s in rb if s in ro and value(rb[s]) is not None and
                   value(ro[s]) is not None and same(rb[s], ro[s]))
    b, o = ({s: value(r[s]) for s in seeds} for r in (rb, ro))
    if not seeds:
        return None
    d = [o[s] - b[s] for s in seeds]
    mean = sum(d) / len(d)
    lo = hi = None
    if len(d) > 1:
        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
        half = T_975.get(len(d) - 1, 1.96) * sd / math.sqrt(len(d))
        lo, hi = mean - half, mean + half
    return {'seeds': seeds, 'diffs': d, 'mean': mean, 'lo': lo, 'hi': hi}


def interval_side(p):
    """'below' when the whole 95 % interval of a paired difference lies under 0, 'above' when
    over it, None when it holds 0 or there is one seed (no interval)."""
    if p['lo'] is None:
        return None
    return 'below' if p['hi'] < 0 else 'above' if p['lo'] > 0 else None


def interval_text(p):
    per = ', '.join(f'{x:+.3f}' for x in p['diffs'])
    ci = '' if p['lo'] is None else f", 95 % interval [{p['lo']:+.3f}, {p['hi']:+.3f}]"
    return f"difference {p['mean']:+.3f}{ci} ({seeds_note(p['seeds'])}: {per})"


def no_worse_word(result, p, labels):
    """The verdict of a 'does not hurt' claim from its paired difference p (PAIRED_RULE)."""
    learning = still_learning(result, labels, set(p['seeds']))
    if learning:
        return 'not settled: ' + learning
    if p['lo'] is None:
        return 'not settled: one seed'
    if p['hi'] <= MARGIN:
        return 'holds'
    if p['lo'] > MARGIN:
        return 'does not hold'
    return f'not settled: the interval straddles +{MARGIN}'


def no_worse_verdict(result, base, other, claim, paper):
    """A 'does not hurt' claim: other's bpc against base's, paired by seed."""
    p = paired_difference(result, base, other)
    name = result['experiment']
    if p is None:
        return claim, paper, '-', 'not measured yet', command(name)
    (b, _), (o, _) = (mean_of(result, l, seeds=set(p['seeds'])) for l in (base, other))
    ours = f"{other} {o:.3f} bpc, {base} {b:.3f}: {interval_text(p)}"
    return claim, paper, ours, no_worse_word(result, p, [base, other]), command(name)


def hashes_verdict(result):
    labels = ['full, shared QK'] + [f'LSH-{r}' for r in (1, 2, 4, 8)]
    claim, paper = 'LSH approaches full attention as hash rounds grow', 'Figure 4'
    # Each round paired with full attention under one recipe (paired_difference checks RECIPE):
    # while a rerun under a new recipe is part-way, runs of the old one must not mix in.
    pairs = {r: paired_difference(result, 'full, shared QK', f'LSH-{r}') for r in (1, 2, 4, 8)}
    done = {r: q for r, q in pairs.items() if q}
    if not done:
        return claim, paper, '-', 'not measured yet', command('hashes')
    if len(done) < len(pairs):
        # part-way (a rerun under a new recipe): the rounds that pair with full attention so far
        missing = ', '.join(f'LSH-{r}' for r in pairs if r not in done)
        ours = '; '.join(f"LSH-{r} - full (shared QK): {interval_text(q)}" for r, q in done.items())
        return (claim, paper, ours, f'not settled: {missing} not run with this recipe yet',
                command('hashes'))
    seeds = set.intersection(*(set(q['seeds']) for q in done.values()))
    full = mean_of(result, 'full, shared QK', seeds=seeds)[0]
    lsh = {r: mean_of(result, f'LSH-{r}', seeds=seeds)[0] for r in (1, 2, 4, 8)}
    p = done[8]
    falling = all(lsh[a] >= lsh[b] for a, b in ((1, 2), (2, 4), (4, 8)))
    word = no_worse_word(result, p, labels)
    if word in ('holds', 'does not hold'):
        word = ('holds' if falling and word == 'holds' else
                'partly: bpc falls with the rounds, but LSH-8 stays above full attention'
                if falling else 'does not hold: bpc does not fall with every doubling')
    nums = ', '.join(f'LSH-{r} {v:.3f}' for r, v in lsh.items())
    ours = f"{nums} against full (shared QK) {full:.3f} bpc; LSH-8 - full: {interval_text(p)}"
    return claim, paper, ours, word, command('hashes')


def bench_verdicts(bench='experiments/bench_results'):
    """The speed and memory claims, from bench.py's saved runs (not redone here)."""
    rows = []
    claim, paper = 'LSH time is flat in length at fixed tokens per step', 'Figure 5'
    try:
        with open(os.path.join(bench, 'speed.json')) as f:
            speed = json.load(f)
        t = {(r['impl'], r.get('n_hashes'), r['length']): r['seconds'] for r in speed['rows']
             if 'seconds' in r}
        lengths = sorted(L for i, h, L in t if i == 'ours' and h == 1)
        full = sorted(L for i, _, L in t if i == 'ours-full')
        lo, hi = lengths[0], lengths[-1]
        ratio = t[('ours', 1, hi)] / t[('ours', 1, lo)]
        ours = (f"LSH-1 {t[('ours', 1, lo)]:.2f} s at {lo}, {t[('ours', 1, hi)]:.2f} s at {hi} "
                f"({ratio:.2f}x); full {t[('ours-full', None, full[0])]:.2f} s at {full[0]}, "
                f"{t[('ours-full', None, full[-1])]:.2f} s at {full[-1]} ({speed['date'][:10]})")
        rows.append((claim, paper, ours, 'holds' if ratio < 1.5 else 'does not hold '
                     '(rule: within 1.5x)', 'python bench.py speed'))
    except (OSError, KeyError, IndexError, TypeError, ZeroDivisionError):
        rows.append((claim, paper, '-', 'not measured yet', 'python bench.py speed'))
    claim, paper = 'Memory is flat in depth with reversible layers', 'Table 3'
    try:
        with open(os.path.join(bench, 'memory-depth.json')) as f:
            mem = json.load(f)
        got = {(r['reversible'], r['n_layers']): r['delta_mb'] for r in mem['rows']
               if r['ff_chunks'] == 1}
        depth = sorted({L for _, L in got})
        ratio = {rev: got[(rev, depth[-1])] / got[(rev, depth[0])] for rev in (True, False)}
        ours = (f"{depth[-1]} layers use {ratio[True]:.2f}x the memory of {depth[0]} reversible, "
                f"{ratio[False]:.2f}x ordinary")
        rows.append((claim, paper, ours, 'holds' if ratio[True] < 1.3 else 'does not hold '
                     '(rule: within 1.3x)', 'python bench.py memory-depth'))
    except (OSError, KeyError, IndexError, ZeroDivisionError):
        rows.append((claim, paper, '-', 'not measured yet', 'python bench.py memory-depth'))
    return rows

LEARNED = 0.5   # Table 2: below half the accuracy under its own attention, a model has not
                # learned the task (the paper's LSH models reach 78-100 % under their own)


def table2_verdict(result, kind='full', claim=None):
    """The paper's collapse: LSH-trained models at chance (1/(vocab - 1)) under full attention
    of the given kind while the full-trained model is not. Rule: at most twice chance counts as
    at chance."""
    claim = claim or "LSH-trained models fall to chance under full attention"
    paper = f"Table 2 ({PAPER_DATA['table2']})"
    groups = by_label(result)
    lsh = [l for l in groups if l.startswith('LSH')]
    vocab = next((r['config'].get('vocab_size') for r in result['runs'] if r.get('config')), None)
    acc = {l: mean_spread(eval_values(groups[l], kind, 'accuracy'))[0] for l in groups}
    if not lsh or vocab is None or any(acc[l] is None for l in lsh):
        return claim, paper, '-', 'not measured yet', command(result['experiment'])
    chance = 1 / (int(vocab) - 1)
    ref = kind if kind in groups else 'full'   # trained with the attention it is evaluated with
    full = acc.get(ref)
    ours = (', '.join(f"{l} {100 * acc[l]:.1f} %" for l in lsh) + f" under {kind}" +
            ('' if full is None else f"; the model trained with {ref}: {100 * full:.1f} %") +
            f" (chance {100 * chance:.1f} %; the paper: 0.8 % and 100 %)")
    # A model that never learned the task under its own attention has nothing to fall from.
    own = {l: mean_spread(eval_values(groups[l], l, 'accuracy'))[0] for l in lsh}
    unlearned = [l for l in lsh if own[l] is not None and own[l] < LEARNED]
    learned = [l for l in lsh if l not in unlearned]
    fell = [l for l in learned if acc[l] <= 2 * chance]
    if unlearned:
        ours += '; ' + ', '.join(f"{l} {100 * own[l]:.1f} %" for l in unlearned) + \
            ' under their own attention'
    word = ('not settled: no LSH model learned the task' if not learned else
            'holds' if len(fell) == len(learned) else 'does not hold' if not fell else
            f"partly: {', '.join(fell)} only")
    if fell and full is not None and full <= 2 * chance:
        word += f', but the model trained with {ref} falls too'
    if learned and unlearned:
        word += f" ({', '.join(unlearned)} never learned the task, so not counted)"
    return claim, paper, ours, word, command(result['experiment'])


def verdict_rows(results):
    """(claim, paper, our data and scale, ours, verdict, command) for every claim we test."""
    missing = lambda claim, paper, name: (claim, paper, '-', 'not measured yet', command(name))
    rows = []   # (experiment, verdict row)
    for name in ('table2', 'table2_sparse'):
        t2 = results.get(name)
        if t2 is None and name != 'table2':
            continue
        claim = "LSH-trained models fall to chance under full attention"
        dot = "... under the authors' dot-product full attention (`--eval_attn=full_dot`)"
        rows += [(name, table2_verdict(t2, claim=claim) if t2 else
                  missing(claim, 'Table 2', name)),
                 (name, table2_verdict(t2, 'full_dot', dot) if t2 else
                  missing(dot, 'Table 2', name))]
    rows.append(('hashes', hashes_verdict(results['hashes']) if 'hashes' in results else
                 missing('LSH approaches full attention as hash rounds grow', 'Figure 4',
                         'hashes')))
    for name, base, other, claim, paper in (
            ('qk', 'full, separate QK', 'full, shared QK', 'Shared QK does not hurt',
             'Figure 3 left'),
            ('reversible', 'ordinary', 'reversible', 'Reversible layers do not hurt (mean join)',
             'Figure 3 right'),
            ('reversible', 'ordinary', 'reversible, concat',
             'Reversible layers do not hurt (concat join, as trax)', 'Figure 3 right')):
        rows.append((name, no_worse_verdict(results[name], base, other, claim, paper)
                     if name in results else missing(claim, paper, name)))
    rows = [(c, p if '(' in p else f"{p} ({PAPER_DATA[n.split('_')[0]]})",
             data_scale(results[n]) if n in results else '-', o, v, cmd)
            for n, (c, p, o, v, cmd) in rows]
    return rows + [(c, p, 'bench.py sizes', o, v, cmd) for c, p, o, v, cmd in bench_verdicts()]


def verdicts_table(results):
    rows = verdict_rows(results)
    return (['| claim | paper (its data) | our data and scale | ours | verdict | command |',
             '|---|---|---|---|---|---|'] +
            [f"| {c} | {p} | {d} | {o} | **{v}** | `{cmd}` |" for c, p, d, o, v, cmd in rows] +
            ['', PAIRED_RULE + f" 'At chance' is at most twice 1/(vocab - 1); an LSH model "
                                f"below {LEARNED:.0%} under its own attention has not learned "
                                f"the task and is not counted."])

SECTIONS = {
    'table2': ("Masked accuracy (%) on the second half, 256 fixed validation sequences, mean ± "
               "half the range over seeds; each trained model is evaluated with every attention "
               "on the same weights."),
    'hashes': ("Bits per byte on the whole valid split (final checkpoint); each LSH model also "
               "evaluated with 8 hashes."),
    'qk': "Bits per byte on the whole valid split (final checkpoint).",
    'length': (f"Bits per byte on the whole valid split (final checkpoint); a run has finished "
               f"when its train-time valid bpc fell by at most {MARGIN} over its last 20 % of "
               f"steps."),
    'reversible': "Bits per byte on the whole valid split (final checkpoint).",
    'depth': "Bits per byte on the whole valid split (final checkpoint).",
    'pattern': "Bits per byte on the whole valid split (final checkpoint).",
}


def missing_runs(results):
    """{experiment: ['label seed s', ...]} for the planned CPU-scale runs not in results."""
    out = {}
    for name in ORDER:
        have = {(r['label'], r['seed']) for r in results.get(name, {}).get('runs', [])}
        todo = [f"{label} seed {seed}" for label, seed, _ in plan(name)
                if (label, seed) not in have]
        if todo:
            out[name] = todo
    return out


def readme_section(results):
    """The Markdown between the README's markers."""
    lines = ['Generated by `python -m experiments.report` from `experiments/results/*.json`; '
             'do not edit by hand.',
             '']
    lines += ['## Verdicts', ''] + verdicts_table(results) + ['']
    missing = missing_runs(results)
    if missing:
        lines += ['Not run yet (each command resumes where the last one stopped): ' + '; '.join(
            f"`{command(n)}`: {', '.join(todo)}" for n, todo in missing.items()) + '.', '']
    if any(r['task'] == 'text' for r in results.values()):
        c = next(r['corpus'] for r in results.values() if 'corpus' in r)
        lines += [f"Corpus for the language models: the Python 3.11 documentation's "
                  f"reStructuredText sources (Debian `python3.11-doc`), {c['bytes']:,} bytes, "
                  f"md5 {c['md5']}, split 90/5/5 by data.py (`python -m experiments.reproduce corpus`).", '']
    for name in ORDER + sorted(set(results) - set(ORDER)):
        if name not in results:
            continue
        r = results[name]
        lines += [f"### {r['title']}", '', f"`{command(name)}` ([results/{name}.json]"
                  f"(results/{name}.json)). "
                  f"{SECTIONS.get(name, SECTIONS['table2'] if r['task'] == 'duplication' else '')}", '']
        lines += (table2_section(r) if r['task'] == 'duplication' else
                  lm_section(r, lsh8=name == 'hashes', at_step=400 if name == 'plateau' else None))
        if name == 'plateau':
            lines += [''] + untrained_section(r) + windows_section(r)
        lines += ['', runs_line(r), '', f"![{name}](results/{name}.png)", '']
        notes = NOTES.get(name, table2_notes if r['task'] == 'duplication' else None)
        lines += notes(r) if notes else []
    return '\n'.join(lines).rstrip() + '\n'


def pct(result, label, eval_label):
    mean, _ = mean_spread(eval_values(by_label(result).get(label, []), eval_label, 'accuracy'))
    return '-' if mean is None else f'{100 * mean:.1f} %'


def left_chance(result, label, above=0.2):
    """Per seed, the first eval step with accuracy above `above` (chance is 1/15)."""
    steps = [next((e['step'] for e in r['curve']['eval'] if e.get('accuracy', 0) > above),
                  None) for r in by_label(result).get(label, []) if r['status'] == 'ok']
    return ', '.join('never' if s is None else str(s) for s in steps) or '-'


def failed_sentence(result):
    failed = [f"{r['label']} seed {r['seed']}" for r in result['runs'] if r['status'] != 'ok']
    return (f"Failed runs: {', '.join(failed)} (their errors are in results/"
            f"{result['experiment']}.json)." if failed else "No run failed or diverged.")


def stopped_improving(run, tol=0.01):
    """(final own accuracy, the first eval step after which accuracy never rose more than tol
    above its value there) of a Table 2 run; the step is the last one while it still improves."""
    ev = [(e['step'], e['accuracy']) for e in run['curve']['eval'] if 'accuracy' in e]
    if not ev:
        return None, None
    step = next(s for i, (s, a) in enumerate(ev) if max(b for _, b in ev[i:]) - a <= tol)
    return ev[-1][1], step


def stuck_sentence(result, target=0.99):
    """The runs below target accuracy at the end: stuck (flat since a step) or still learning."""
    out = []
    for r in result['runs']:
        if r['status'] != 'ok':
            continue
        final, step = stopped_improving(r)
        if final is not None and final < target:
            end = r['curve']['eval'][-1]['step']
            out.append(f"{r['label']} seed {r['seed']} at {100 * final:.1f} % "
                       + (f"(stuck: no gain above 1 point after step {step})" if step < end
                          else "(still improving at the last step)"))
    return (f"Runs below {100 * target:.0f} % at the end: " + '; '.join(out) + '.' if out else
            f"Every run reached {100 * target:.0f} % under its own attention.")


def conventions_sentence(result):
    """Which single convention of the authors' full attention makes LSH-trained models fall."""
    groups = by_label(result)
    lsh = [l for l in groups if l.startswith('LSH')]
    have = lambda l, k: [v for v in eval_values(groups[l], k, 'accuracy') if v is not None]
    if not lsh or any(not have(l, k) for l in lsh for k in TABLE2_DOT):
        return ('The dot-product evaluations have not been run yet (`'
                + command(result['experiment']) + '`).')
    vocab = int(next(r['config']['vocab_size'] for r in result['runs']))
    chance = 1 / (vocab - 1)
    per = {k: {l: mean_spread(eval_values(groups[l], k, 'accuracy'))[0] for l in groups}
           for k in TABLE2_DOT}
    per_full = {l: mean_spread(eval_values(groups[l], 'full', 'accuracy'))[0] for l in groups}
    text = '; '.join(f"{k}: " + ', '.join(f"{l} {100 * v:.1f} %" for l, v in per[k].items()
                                          if v is not None) for k in TABLE2_DOT)
    alone = [k for k in TABLE2_DOT[1:] if all(per[k][l] <= 2 * chance for l in lsh)]
    verdict = (f"Alone, {' and '.join(alone)} bring{'s' if len(alone) == 1 else ''} every "
               f"LSH-trained model to chance." if alone else
               "No single convention alone brings every LSH-trained model to chance.")
    mean = lambda k: sum(per[k][l] for l in lsh) / len(lsh)
    most = min(TABLE2_DOT[1:], key=mean)
    verdict += (f" Of the three alone, {most} does the most: the LSH-trained models average "
                f"{100 * mean(most):.1f} % under it, {100 * mean('full_dot'):.1f} % under all "
                f"three (full_dot), {100 * sum(per_full[l] for l in lsh) / len(lsh):.1f} % under "
                f"ours (full).")
    ref = per['full_dot'].get('full_dot')
    finding = ''
    if all(per['full_dot'][l] <= 2 * chance for l in lsh) and ref is not None and ref > 0.9:
        finding = (" This accounts for the paper's 0.8 %, which no reproduction had explained: "
                   "under the authors' dot-product attention every LSH-trained model is at "
                   "chance while the model trained with it is not, and under our full attention, "
                   "which keeps LSH's conventions, none is. With shared QK a query's own key is "
                   "its best match; a model trained with it masked has never learned to ignore "
                   "it.")
    return (f"Under the authors' dot-product full attention and each of its conventions alone "
            f"(mean over seeds): {text}. {verdict} Chance is {100 * chance:.1f} %.{finding}")


def table2_notes(result):
    lsh = [l for l in by_label(result) if l.startswith('LSH')]
    per_seed = '; '.join(f"{l}: " + ', '.join(
        f"{100 * r['evals'].get(l, {}).get('accuracy', float('nan')):.1f} %"
        for r in by_label(result)[l] if r['status'] == 'ok') for l in lsh)
    chance = '; '.join(f"{l}: {left_chance(result, l)}" for l in by_label(result))
    own = ', '.join(f"{l} {pct(result, l, l)}" for l in lsh)
    to_full = ', '.join(f"{l} {pct(result, l, 'full')}" for l in lsh)
    c = next((r['config'] for r in result['runs'] if r.get('config')), {})
    T, m = (int(c[k]) if c.get(k) else None for k in ('seq_len', 'bucket_size'))
    share = f"2 x {m} of {T} keys per round ({2 * m / T:.0%})" if T and m else "-"
    return [
        f"Each LSH-trained model under its own attention: {own}; the same weights under full "
        f"attention: {to_full} (the paper: 0.8 % for every row; the fastai reproduction: "
        f"{min(v[0] for k, v in FASTAI_TABLE2.items() if k != 'full'):.1f}-"
        f"{max(v[0] for k, v in FASTAI_TABLE2.items() if k != 'full'):.1f} %). The full-trained "
        f"model under LSH-1: {pct(result, 'full', 'LSH-1')} (the paper: "
        f"{PAPER_TABLE2['full'][-1]} %, the fastai reproduction: {FASTAI_TABLE2['full'][-1]} %). "
        f"Our full attention with shared QK normalises keys and masks a query's own key exactly "
        f"as LSH does, so an LSH-trained model sees under it a superset of its windows.", '',
        f"Sparsity at this size: an LSH query sees {share}.", '',
        conventions_sentence(result), '',
        f"Per seed, own attention: {per_seed}. The first eval above 20 % accuracy (leaving "
        f"chance), per seed: {chance}. {stuck_sentence(result)} {failed_sentence(result)}", '']


def leaves(result, label):
    """'step' (or 'a, b' over seeds; 'never' past the last step) at which a variant left the
    plateau; '-' if it has no runs."""
    return ', '.join('never' if s is None else str(s) for s in leave_steps(result, label)) or '-'


def window(result, label, state, rounds, layer=0, key='prev_in_window'):
    run = next((r for r in result['runs'] if r['label'] == label and r.get('windows')), None)
    try:
        return f"{run['windows'][state][rounds][layer][key]:.0%}"
    except (TypeError, KeyError, IndexError):
        return '-'


def untrained(result, T, rounds, pos_emb='axial', key='prev_in_window'):
    row = next((r for r in result.get('untrained_windows', []) if r['T'] == T and
                r['pos_emb'] == pos_emb), None)
    return f"{row[rounds][0][key]:.0%}" if row and rounds in row else '-'


def hashes_notes(result):
    lsh = [l for l in by_label(result) if l.startswith('LSH-') and l[4:].isdigit() and
           l != 'LSH-8']
    own = {l: mean_spread(eval_values(by_label(result)[l], 'own', 'bpc'))[0] for l in lsh}
    at8 = {l: mean_spread(eval_values(by_label(result)[l], 'LSH-8', 'bpc'))[0] for l in lsh}
    pairs = '; '.join(f"{l} {bpc(result, l)} -> {bpc(result, l, 'LSH-8')}" for l in lsh)
    better = [l for l in lsh if own[l] is not None and at8[l] is not None and at8[l] < own[l]]
    return [f"The step at which each model's valid bpc first falls below {PLATEAU_BPC} (leaving "
            f"the bigram plateau): full attention {leaves(result, 'full, separate QK')} "
            f"(separate QK), {leaves(result, 'full, shared QK')} (shared QK); " +
            ', '.join(f"{l}: {leaves(result, l)}" for l in lsh + ['LSH-8']) + ". "
            f"The same weights evaluated with 8 hashes instead of their own (own -> LSH-8): "
            f"{pairs}; {len(better)} of {len(lsh)} evaluate better with 8. The fastai "
            f"reproduction: LSH-4 at {FASTAI_LSH4_BPC[2]} / {FASTAI_LSH4_BPC[8]} test bpc "
            f"evaluated with 2 / 8 hashes (enwik8, 3 layers, length 4096).", '', suspects_sentence(result), '']


def suspects_sentence(result):
    """What LSH misses, suspect by suspect: each fix against the same LSH model, paired by seed.
    A suspect is pointed to when the whole 95 % interval of (fixed - LSH) lies below zero."""
    pairs = [(f'LSH-{r}, dedup', f'LSH-{r}', f'dedup at {r} rounds') for r in (2, 4, 8)] + [
        ('local + LSH-4', 'LSH-4', 'a local layer below LSH-4 (the previous bytes)')]
    found, parts = [], []
    for fixed, lsh, what in pairs:
        p = paired_difference(result, lsh, fixed)
        if p is None:
            continue
        parts.append(f"{what}: {interval_text(p)}")
        if interval_side(p) == 'below':
            found.append(what)
    if not parts:
        return "The suspects (dedup, a local layer) have not been run yet."
    return ("What each suspect's fix changes, in bpc against the same LSH model: " +
            '; '.join(parts) + '. ' + (f"The numbers point to {', '.join(found)}." if found else
                                       "No fix lowers bpc with its whole interval below zero.") +
            remedy_sentence(result))


def remedy_sentence(result):
    """The paper's remedy against the goal: local + LSH-4 against full attention (shared QK),
    paired by seed; '' until both have run."""
    p = paired_difference(result, 'full, shared QK', 'local + LSH-4')
    if p is None:
        return ''
    where = {'below': 'below full attention: the whole interval under zero',
             'above': 'above full attention: the whole interval over zero'}.get(
        interval_side(p), 'not told apart from full attention')
    return f" Against full attention (shared QK), local + LSH-4 is {where}: {interval_text(p)}."


def plateau_notes(result):
    g = lambda label: leaves(result, label)
    w = lambda *a, **k: window(result, *a, **k)
    u = lambda T, r, pos='axial': untrained(result, T, r, pos)
    return [
        f"Leaving the bigram plateau is learning to look at the previous few bytes. Trained, "
        f"the full-attention model puts {w('full, shared QK', 'trained', 'LSH-1', key='prev_mass')}"
        f" of layer 1's weight on the previous byte alone (untrained: "
        f"{w('full, shared QK', 'untrained', 'LSH-1', key='prev_mass')}). LSH attention can "
        f"learn that only for the queries whose windows hold those keys, and the windows are "
        f"drawn afresh at every step. Untrained, the previous byte is in a query's windows for "
        f"LSH-1 / 2 / 4 / 8 {u(256, 'LSH-1')} / {u(256, 'LSH-2')} / {u(256, 'LSH-4')} / "
        f"{u(256, 'LSH-8')} of the queries at T = 256, and {u(512, 'LSH-1')} / "
        f"{u(512, 'LSH-2')} / {u(512, 'LSH-4')} / {u(512, 'LSH-8')} at T = 512 with the same "
        f"bucket; with sinusoidal positions, {u(256, 'LSH-4', 'sinusoidal')} for LSH-4 at 256. "
        f"Trained, the LSH-4 model's windows hold it for {w('LSH-4', 'trained', 'LSH-4')} of "
        f"the queries.", '',
        f"Steps at which each left {PLATEAU_BPC} bpc: LSH-4 {g('LSH-4')}, full attention "
        f"{g('full, shared QK')}, local attention (its window always holds the previous "
        f"bytes) {g('local, bucket 16')}, LSH-4 with bucket 64 {g('LSH-4, bucket 64')}, "
        f"LSH-4 with sinusoidal positions {g('LSH-4, sinusoidal')} (valid bpc "
        f"{bpc(result, 'LSH-4, sinusoidal')}). "
        f"{run_note(result, 'LSH-4, sinusoidal')}", '']


def run_note(result, label):
    """The 'note' a results file keeps on a run (a measurement made outside the experiment);
    it goes when the run is redone, since save_run replaces the whole record."""
    return ' '.join(r['note'] for r in by_label(result).get(label, []) if r.get('note'))


def bpc(result, label, eval_label='own'):
    """'mean ± spread' valid bpc of a variant's runs, evaluated with eval_label."""
    return cell(eval_values(by_label(result).get(label, []), eval_label, 'bpc'))


def qk_notes(result):
    s, p = leave_steps(result, 'full, shared QK'), leave_steps(result, 'full, separate QK')
    later = (sum(s) / len(s) > sum(p) / len(p)) if s and p and None not in s + p else None
    order = {True: 'later than', False: 'no later than', None: 'at'}[later]
    return [f"Shared QK: {bpc(result, 'full, shared QK')} bpc against separate QK's "
            f"{bpc(result, 'full, separate QK')}; it left the plateau {order} separate QK "
            f"(steps {leaves(result, 'full, shared QK')} against "
            f"{leaves(result, 'full, separate QK')}). Shared QK here is the authors' form: keys "
            f"normalised to unit length, no 1/sqrt(d) on the logits, a query's own key used only "
            f"when nothing else is there. The fastai reproduction found shared QK worse; the "
            f"paper, not worse.", '', self_key_sentence(result), '']


SELF_ALLOWED = 'full, shared QK, self allowed'


def self_key_sentence(result):
    """The suspect for what shared QK costs: a query barred from its own key. Its fix against
    shared QK, paired by seed, and the share of the shared - separate gap it closes over the
    same seeds. It is pointed to when the whole 95 % interval of (fixed - shared) lies below 0."""
    p = paired_difference(result, 'full, shared QK', SELF_ALLOWED)
    if p is None:
        return (f"The suspect, a query barred from its own key, is not run yet (variant "
                f"'{SELF_ALLOWED}': `--attn=full_self`).")
    g = paired_difference(result, 'full, separate QK', 'full, shared QK')
    gap = [d for s, d in zip(g['seeds'], g['diffs']) if s in p['seeds']] if g else []
    share = (f"; the gap shared - separate over the same seeds is {sum(gap) / len(gap):+.3f}, so "
             f"allowing it closes {-100 * p['mean'] / (sum(gap) / len(gap)):.0f} % of the gap"
             if gap and sum(gap) != 0 and p['mean'] < 0 else '')
    word = ('one seed: a direction, not a verdict' if p['lo'] is None else
            {'below': 'pointed to', 'above': 'ruled out: allowing it makes shared QK worse'}.get(
                interval_side(p), 'not pointed to'))
    why = (" With unit keys, a query's logit on its own key, q.q/|q| = |q|, is at least its logit "
           "on any other key (Cauchy-Schwarz), so a query allowed its own key attends mostly to "
           "itself: the mask is what keeps shared QK useful, not what it costs."
           if word.startswith('ruled out') else '')
    return (f"The suspect, a query barred from its own key (`--attn=full_self` allows it, all "
            f"else as shared QK): self allowed - shared QK {interval_text(p)}{share}: **{word}** "
            f"(the rule: pointed to when the whole interval is below 0, ruled out when above)."
            f"{why}")


def leave_steps(result, label):
    return [leave_step(r, PLATEAU_BPC) for r in by_label(result).get(label, [])
            if r['status'] == 'ok']


def gap_drift(result, base, other, frac=0.8):
    """How the paired gap (other - base, train-time valid bpc, same seed and RECIPE) moved over
    the last 1 - frac of the steps: {'seeds', 'then', 'end'} (mean gaps at frac and at the end),
    or None without a pair. A gap that stays put while both runs still fall is a difference in
    where they are going, not a delay that more steps would close."""
    p = paired_difference(result, base, other)
    if p is None:
        return None
    runs = {l: {r['seed']: r for r in by_label(result)[l] if r['status'] == 'ok'}
            for l in (base, other)}
    then, end = [], []
    for s in p['seeds']:
        b, o = runs[base][s], runs[other][s]
        tb, to = bpc_at_fraction(b, frac), bpc_at_fraction(o, frac)
        if tb is None or to is None:
            return None
        then.append(to - tb)
        end.append(o['curve']['eval'][-1]['bpc'] - b['curve']['eval'][-1]['bpc'])
    mean = lambda xs: sum(xs) / len(xs)
    return {'seeds': p['seeds'], 'then': mean(then), 'end': mean(end)}


def gap_drift_sentence(result, base, others, frac=0.8, tol=0.005):
    """How each gap to base moved over the last 1 - frac of the steps, and what that says."""
    drifts = [(other, gap_drift(result, base, other, frac)) for other in others]
    drifts = [(other, g) for other, g in drifts if g is not None]
    if not drifts:
        return []
    word = lambda g: ('shrank' if g['end'] < g['then'] - tol else
                      'grew' if g['end'] > g['then'] + tol else 'held')
    closing = any(word(g) == 'shrank' for _, g in drifts)
    return [f"The gap to {base} layers on the train-time evals (32 fixed batches; mean over "
            f"{seeds_note(drifts[0][1]['seeds'])}) over the last fifth of the steps: " + '; '.join(
                f"{other} {g['then']:+.3f} at {frac * 100:.0f} % of the steps, {g['end']:+.3f} at "
                f"the end ({word(g)})" for other, g in drifts) + '. ' +
            ("A gap that shrinks may be a delay that more steps would close." if closing else
             "No gap shrank over the last fifth, so these are not delays that more steps at this "
             "schedule would close.") +
            " The verdicts' rule still waits for the runs to flatten.", '']


def reversible_notes(result):
    return [f"Reversible, the streams joined by their mean (tied output): "
            f"{bpc(result, 'reversible')} bpc; joined by concatenation, LayerNorm(2C) and an "
            f"untied output (trax's ReformerLM, Hugging Face): {bpc(result, 'reversible, concat')};"
            f" ordinary layers: {bpc(result, 'ordinary')} (the fastai reproduction: a "
            f"{FASTAI_REVERSIBLE_GAP} bpc gap with the mean; the paper: 'nearly the same'). They "
            f"left the plateau at steps {leaves(result, 'reversible')}, "
            f"{leaves(result, 'reversible, concat')} and {leaves(result, 'ordinary')}.", ''] + \
        join_sentence(result) + \
        gap_drift_sentence(result, 'ordinary', ['reversible', 'reversible, concat'])


def join_sentence(result):
    """The two joins against each other, paired by seed: which one the interval favours."""
    p = paired_difference(result, 'reversible', 'reversible, concat')
    if p is None:
        return []
    every = all(d < 0 for d in p['diffs']) and 'lower on every seed' or \
        all(d > 0 for d in p['diffs']) and 'higher on every seed' or 'lower on some seeds only'
    if p['lo'] is not None and p['hi'] < 0:
        says = "the concatenation is the better join: the whole interval lies below 0"
    elif p['lo'] is not None and p['lo'] > 0:
        says = "the mean is the better join: the whole interval lies above 0"
    else:
        says = "the interval does not separate the two joins"
    return [f"Concatenation against the mean, paired by seed: {interval_text(p)}; concat is "
            f"{every}, and {says}.", '']


def length_notes(result):
    """How the fall over the last 20 % shrinks with the length, and the first length that
    finished by the rule (seed 0 of the baseline)."""
    runs = sorted((int(r['config']['max_steps']), last_fifth_drop(r)) for r in result['runs']
                  if r['status'] == 'ok' and r.get('config') and last_fifth_drop(r) is not None)
    if not runs:
        return []
    done = [n for n, d in runs if d <= MARGIN]
    ratios = [f"{b / a:.2f}" for (_, a), (_, b) in zip(runs, runs[1:])]
    return ["The fall over the last 20 % of steps: " + ', '.join(
                f"{d:.3f} bpc at {n:,} steps" for n, d in runs) +
            (f"; each doubling of the length multiplies it by {', then '.join(ratios)}" if ratios
             else '') + '. ' +
            (f"{done[0]:,} steps is the first length within {MARGIN}." if done else
             f"No length measured is within {MARGIN}: the language-model comparisons run "
             f"{LM_STEPS:,} steps, the longest that fits the CPU budget, and their verdicts say "
             f"'still learning' where that holds."), '']


def pattern_notes(result):
    c = next((r['config'] for r in result['runs'] if r.get('config')), {})
    return [f"{c.get('n_layers')} layers each; " + '; '.join(
        f"{l}: {bpc(result, l)} bpc, leaves {PLATEAU_BPC} at {leaves(result, l)}"
        for l in by_label(result)) + ". Local layers give every query its previous bytes "
            "from the first step (see `plateau`).", '']


def depth_notes(result):
    return [f"The same steps and tokens for every depth: 1 / 2 / 4 layers reach "
            f"{bpc(result, '1 layer')} / {bpc(result, '2 layers')} / {bpc(result, '4 layers')} "
            f"bpc. The fastai reproduction ran 3 / 6 / 12 layers at length 16K. A deeper model "
            f"is slower per step: the wall-time panel compares at equal time.", '']


NOTES = {'table2': table2_notes, 'hashes': hashes_notes, 'plateau': plateau_notes,
         'length': length_notes,
         'qk': qk_notes, 'reversible': reversible_notes, 'depth': depth_notes,
         'pattern': pattern_notes}


def bench_block(bench, link):
    """The README's benchmark summary from bench.py's speed.json: per n_hashes, ours and the
    faster peer at the shortest and longest length and their ratio; links relative to `link`
    (bench's folder as the README sees it)."""
    try:
        with open(os.path.join(bench, 'speed.json')) as f:
            speed = json.load(f)
    except OSError:
        return f"No {link}/speed.json yet: `python bench.py speed`.\n"
    sec = {(r['impl'], r.get('n_hashes'), r['length']): r['seconds'] for r in speed['rows']
           if 'seconds' in r}
    lengths = sorted({L for _, _, L in sec})
    lo, hi = lengths[0], lengths[-1]
    lines = [f"Generated by `python -m experiments.report` from `{link}/speed.json` "
             f"(`python bench.py {speed['command']}`, {speed['date'][:10]}, commit {speed['code']}, {speed['device']}); do not edit by "
             f"hand. Seconds per forward+backward of one attention layer, {speed['tokens']:,} "
             f"tokens per step:", '',
             f'| n_hashes | ours, {lo} / {hi} | faster peer, {lo} / {hi} | faster peer / ours |',
             '|---|---|---|---|']
    for h in sorted({h for i, h, _ in sec if i == 'ours'}):
        ours = [sec.get(('ours', h, L)) for L in (lo, hi)]
        peer = [min((v for (i, hh, LL), v in sec.items() if i != 'ours' and hh == h and LL == L),
                    default=None) for L in (lo, hi)]
        if None in ours + peer:
            continue
        lines.append(f"| {h} | {ours[0]:.2f} / {ours[1]:.2f} | {peer[0]:.2f} / {peer[1]:.2f} | "
                     f"{peer[0] / ours[0]:.2f} / {peer[1] / ours[1]:.2f} |")
    lines += ['', f"![speed]({link}/speed.png)", '',
              f"Every benchmark, its method and its machine: [{link}/README.md]({link}/README.md)."]
    return '\n'.join(lines) + '\n'


DECODE_START, DECODE_END = '<!-- decode:start -->', '<!-- decode:end -->'


def decode_block(bench, link):
    """translation/README.md's decoding table from bench.py decode's decode.json: tokens per CPU
    second (the machine may be shared: wall seconds swing with its load, CPU seconds less) and
    our speed over the peer and over recomputing the prefix."""
    try:
        with open(os.path.join(bench, 'decode.json')) as f:
            d = json.load(f)
    except OSError:
        return f"No {link}/decode.json yet: `python bench.py decode`.\n"
    rows = {r['impl']: r for r in d['rows']}
    lines = [f"Generated by `python -m experiments.report` from `{link}/decode.json` (`python "
             f"bench.py {' '.join(d['argv'])}`, {d['date'][:10]}, commit {d['code']}, "
             f"{d['device']}, load {d['load_at_start'][0]:.1f} at the start); do not edit by "
             f"hand. A random {d['n_layers']} + {d['n_layers']}-layer model, d_model "
             f"{d['d_model']}, vocabulary {d['vocab_size']:,}, {d['d_ff']} FF, "
             f"{d['rows'][0]['batch']} sentences of {d['src_len']} source tokens, "
             f"{d['rows'][0]['length']} target tokens each (every decoder runs to that length):",
             '', '| decoder | CPU seconds | tokens / CPU s | tokens / s (wall) |', '|---|---|---|---|']
    for name, r in rows.items():
        lines.append(f"| {name} | {r['cpu_seconds']:.2f} | {r['cpu_tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s']:,.0f} |")
    ratio = lambda a, b: (f"{rows[a]['cpu_tokens_per_s'] / rows[b]['cpu_tokens_per_s']:.2f}x"
                          if a in rows and b in rows else '-')
    lines += ['', f"Ours over Hugging Face's MarianMTModel (`generate()`, its own cache): "
                  f"{ratio('ours, greedy', 'marian, greedy')} greedy, "
                  f"{ratio('ours, beam 4', 'marian, beam 4')} with beam 4; the cache over "
                  f"recomputing the prefix: {ratio('ours, greedy', 'ours, greedy, recompute')}."]
    lines += decode_floor_sentence(d, rows)
    return '\n'.join(lines) + '\n'


def decode_floor_sentence(d, rows):
    """How far cached greedy decoding is from the memory floor (bench.py decode_bytes over the
    machine's read rate), and what the 10x-over-recompute target asks of it; [] for a decode.json
    written before bench.py measured the floor."""
    ours, again = rows.get('ours, greedy', {}), rows.get('ours, greedy, recompute')
    if 'floor_s' not in ours or not again:
        return []
    need = again['seconds'] / 10
    mb = ours['floor_s'] * d['stream_bytes_per_s'] / 2 ** 20
    return ['', f"Every cached step reads every decoder weight it uses, the output layer and the "
                f"keys and values so far: {mb:,.0f} MB over the {ours['length']} steps, at least "
                f"{ours['floor_s']:.3f} s at the {d['stream_bytes_per_s'] / 1e9:.1f} GB/s at "
                f"which this core reads memory. Ours "
                f"takes {ours['seconds']:.3f} s (wall, with the encoder and the cache's set-up), "
                f"{ours['of_floor']:.2f}x that floor. 10x over recomputing "
                f"({again['seconds']:.3f} s) needs {need:.3f} s, {need / ours['floor_s']:.2f}x "
                f"the floor."]


PARALLEL_START, PARALLEL_END = '<!-- parallel_small:start -->', '<!-- parallel_small:end -->'
PARALLEL_TARGET_S = 3600   # the bare command's promise: about an hour on 2 cores


def parallel_small_block(results_dir, link):
    """translation/README.md's account of the bare --dataset=parallel command, timed end to end
    (reproduce.py parallel_small): the time against the hour, the best validation NLL, the test
    scores and two of the saved test translations."""
    try:
        with open(os.path.join(results_dir, 'parallel_small.json')) as f:
            r = json.load(f)
    except OSError:
        return (f"No {link}/parallel_small.json yet: `python -m experiments.reproduce "
                f"parallel_small`.\n")
    t, test, m, best = r['train'], r['test'], r['machine'], r['best']
    wall = t['wall_s']
    load = (f"{t['load_before'][0]:.1f} at the start, " if t.get('load_before') else '') + \
        f"{t['load_after'][0]:.1f} at the end"
    met = 'met' if wall <= PARALLEL_TARGET_S else 'not met'
    lines = [
        f"Generated by `python -m experiments.report` from `{link}/parallel_small.json`; do not "
        f"edit by hand. `python -m experiments.reproduce parallel_small` runs `{r['command']}` "
        f"({r['data']['pairs']:,} pairs) and nothing else, on {m['cpu']}, {m['cores']} cores, "
        f"torch {m['torch']} (load average {load}), then `{r['translate_command']}`.", '',
        f"- **End to end: {wall / 60:.1f} minutes** for {r['steps']:,} steps, vocabulary training, "
        f"evals and the closing greedy BLEU included; the target, under about an hour, is "
        f"**{met}**.",
        f"- Best validation NLL {best['nll']:.3f} (perplexity {best['ppl']:.1f}) at step "
        f"{best['step']:,}, the checkpoint `translate.py` reads.",
        f"- Test part ({test['n_sentences']:,} pairs, beam {test['beam_size']}, alpha "
        f"{test['alpha']}): **sacreBLEU {test['bleu']:.2f}**, chrF {test['chrf']:.1f}, decoded in "
        f"{test['decode_seconds']:.0f} s (`{test['bleu_signature']}`)."]
    for e in test.get('examples', [])[:2]:
        lines += [f"  - source: {e['source']}", f"    reference: {e['reference']}",
                  f"    ours: {e['hypothesis']}"]
    return '\n'.join(lines) + '\n'


AVERAGING_START, AVERAGING_END = '<!-- averaging:start -->', '<!-- averaging:end -->'


def averaging_block(results_dir, link):
    """translation/README.md's checkpoint-averaging table (reproduce.py averaging): the last,
    the best and the averaged checkpoint, on the valid NLL and the test BLEU and chrF."""
    try:
        with open(os.path.join(results_dir, 'averaging.json')) as f:
            r = json.load(f)
    except OSError:
        return f"No {link}/averaging.json yet: `python -m experiments.reproduce averaging`.\n"
    c = r['checkpoints']
    first = next(iter(c.values()))
    lines = [f"Generated by `python -m experiments.report` from `{link}/averaging.json`; do not "
             f"edit by hand. `python -m experiments.reproduce averaging` continues the run above "
             f"from its last step: `{r['command']}` (with `--resume`), then scores each "
             f"checkpoint on the whole valid part (NLL, not label-smoothed) and on the test part "
             f"({first['n_sentences']:,} pairs, beam {first['beam_size']}).", '',
             '| checkpoint | weights of steps | valid NLL | test sacreBLEU | chrF |',
             '|---|---|---|---|---|']
    names = {'last': 'last (`ckpt.pt`)', 'best': 'best valid NLL (`ckpt_best.pt`)',
             'avg': 'average (`ckpt_avg.pt`)'}
    for kind, x in c.items():
        steps = ', '.join(f'{s:,}' for s in (x['averaged_steps'] or [x['step']]))
        nll = '-' if x['valid_nll'] is None else f"{x['valid_nll']:.3f}"
        lines.append(f"| {names[kind]} | {steps} | {nll} | {x['bleu']:.2f} | {x['chrf']:.1f} |")
    if 'avg' in c and 'best' in c:
        d_bleu, d_chrf = c['avg']['bleu'] - c['best']['bleu'], c['avg']['chrf'] - c['best']['chrf']
        word = 'helps' if d_bleu > 0 and d_chrf > 0 else 'hurts' if d_bleu < 0 and d_chrf < 0 \
            else 'is mixed'
        lines += ['', f"Against the best single checkpoint, averaging {word} here: "
                      f"{d_bleu:+.2f} BLEU, {d_chrf:+.1f} chrF (one run, one test set: no "
                      f"interval)."]
    return '\n'.join(lines) + '\n'


# compare_translation.py's files, one per corpus, each with its block in translation/README.md
# between '<!-- NAME:start -->' and '<!-- NAME:end -->': Ding (en-de) and the Bible (en-es)
TRANSLATION_RUNS = ('translation', 'translation_bible')
TRANSLATION_NAMES = {'reformer': 'ours, reversible', 'reformer_not_reversible':
                     'ours, not reversible', 'transformer': '`torch.nn.Transformer`'}


def translation_block(results_dir, link, name='translation'):
    """translation/README.md's side-by-side comparison from compare_translation.py's
    results_dir/NAME.json: the setup, the scores, the losses at equal steps, BLEU by minute, the
    targets (ours reversible at or above nn.Transformer in BLEU and chrF, ours not reversible
    above it) and three of the curve's sentences (ours reversible's best, middle and worst by
    sentence chrF)."""
    try:
        with open(os.path.join(results_dir, f'{name}.json')) as f:
            r = json.load(f)
    except OSError:
        return (f"No {link}/{name}.json yet: `python -m translation.compare_translation "
                f"--out={link}/{name}.json`.\n")
    a, c, m = r['args'], r['config'], r['models']
    names = [k for k in TRANSLATION_NAMES if k in m]
    first = m[names[0]]
    lines = [
        f"Generated by `python -m experiments.report` from `{link}/{name}.json`; do not "
        f"edit by hand. `{r['command']}`: {r['n_train']:,} training pairs, {r['n_test']:,} "
        f"test, a joint sentencepiece vocabulary of {r['vocab_size']:,}; every model "
        f"{c['n_layers']} + {c['n_dec_layers']} layers, d_model {c['d_model']}, "
        f"{c['n_heads']} heads, d_ff {c['d_ff']}, dropout {c['dropout']}, label smoothing "
        f"{c['label_smoothing']}, tied embeddings, init `{a.get('init', '-')}`; the same batches of at "
        f"most {a['max_tokens']:,} padded tokens; Adam, {a['warmup']} warmup steps then rsqrt "
        f"decay from {a['lr']:g}; {a['budget_s'] / 60:g} minutes of training each, taken in "
        f"turns, {r['machine']['threads']} thread(s) on {r['machine']['cores']} cores (load "
        f"{r['machine']['load_avg'][0]:.1f} at the end); then beam {first['beam_size']}, alpha "
        f"{first['alpha']} on the test part.", '',
        '| model | parameters | steps | s / step | valid NLL (ppl) | test sacreBLEU | chrF | '
        'teacher-forced token accuracy | decoding the test part |', '|---|---|---|---|---|---|---|---|---|']
    for k in names:
        x = m[k]
        lines.append(
            f"| {TRANSLATION_NAMES[k]} | {x['params'] / 1e6:.2f}M | {x['steps']:,} | "
            f"{x['train_seconds'] / x['steps']:.2f} | {x['valid_nll']:.3f} ({x['valid_ppl']:.1f}) "
            f"| {x['bleu']:.2f} | {x['chrf']:.1f} | {100 * x['teacher_forced_token_accuracy']:.1f} "
            f"% | {x['decode_seconds']:.0f} s |")
    lines += ['', f"sacreBLEU signature `{first['bleu_signature']}`; chrF "
                  f"`{first['chrf_signature']}`."]
    eq = r['equal']['step']
    for k in names[:-1]:
        d = equal_step_gap(r, k)
        if d:
            lines += ['', f"At equal steps ({len(d)} points up to step {eq['at'][-1]:,}), the "
                          f"training loss of {TRANSLATION_NAMES[k]} is {min(d):+.1f} % to "
                          f"{max(d):+.1f} % of `nn.Transformer`'s (mean {sum(d) / len(d):+.1f} "
                          f"%; the target is within about 2 %)."]
    if all('bleu_curve' in m[k] for k in names):
        n = len(r.get('curve_pairs', []))
        lines += ['', f"sacreBLEU on the first {n:,} test sentences as training goes on "
                      f"(weights kept at each point, scored after training):", '',
                  '| ' + ' | '.join(['minutes'] + [TRANSLATION_NAMES[k] for k in names]) + ' |',
                  '|---|' + '---|' * len(names)]
        for i in range(min(len(m[k]['bleu_curve']) for k in names)):
            points = [m[k]['bleu_curve'][i] for k in names]
            lines.append(f"| {points[0]['seconds'] / 60:.0f} | "
                         + ' | '.join(f"{p['bleu']:.2f}" for p in points) + ' |')
        lines += ['', f"![BLEU against minutes]({link}/{name}.png)"]
    if 'transformer' in m and 'reformer' in m:
        t, rev = m['transformer'], m['reformer']
        met = lambda x: x['bleu'] >= t['bleu'] and x['chrf'] >= t['chrf']
        verdict = [f"Target, ours reversible at or above `nn.Transformer` in sacreBLEU and chrF: "
                   f"**{'met' if met(rev) else 'not met'}** ({rev['bleu'] - t['bleu']:+.2f} BLEU, "
                   f"{rev['chrf'] - t['chrf']:+.1f} chrF)."]
        if 'reformer_not_reversible' in m:
            nr = m['reformer_not_reversible']
            above = nr['bleu'] > t['bleu'] and nr['chrf'] > t['chrf']
            verdict.append(f"Ours not reversible above it: **{'met' if above else 'not met'}** "
                           f"({nr['bleu'] - t['bleu']:+.2f} BLEU, {nr['chrf'] - t['chrf']:+.1f} "
                           f"chrF).")
        if not met(rev):
            verdict.append(trails_sentence(r))
        nll = ', '.join(f"{TRANSLATION_NAMES[k]} {m[k]['valid_nll']:.3f}"
                        for k in sorted(names, key=lambda k: m[k]['valid_nll']))
        best = max(m[k]["bleu"] for k in names)
        if best < 5:
            verdict.append(f"Every model is below 5 BLEU (the best {best:.2f}): at this budget none "
                           f"translates yet, and BLEU differences this small do not rank them; "
                           f"the validation NLL, over every target token, does: {nll}.")
        lines += ['', ' '.join(verdict)]
    lines += translation_examples(r, names)
    return '\n'.join(lines) + '\n'


def equal_step_gap(r, k):
    """100 (loss_k / loss_nn.Transformer - 1) at each equal step both logged, or []."""
    eq = r['equal']['step']
    if 'transformer' not in eq or k not in eq:
        return []
    return [100 * (x / y - 1) for x, y in zip(eq[k], eq['transformer'])
            if x is not None and y is not None]


def trails_sentence(r):
    """Why ours reversible trails nn.Transformer at equal time, from the file: how many fewer
    steps it made (the reversible backward recomputes each layer's forward) and its loss at equal
    steps: on time, if that loss is within 2 % (the per-step target), else on learning as well."""
    rev, t = r['models']['reformer'], r['models']['transformer']
    d = equal_step_gap(r, 'reformer')
    per_step = lambda x: x['train_seconds'] / x['steps']
    text = (f"Ours reversible made {rev['steps']:,} steps to `nn.Transformer`'s {t['steps']:,} "
            f"({100 * (1 - rev['steps'] / t['steps']):.0f} % fewer: {per_step(rev):.2f} against "
            f"{per_step(t):.2f} s a step, as the reversible backward recomputes every layer's "
            f"forward)")
    if not d:
        return text + '.'
    mean = sum(d) / len(d)
    why = ('so it trails on time, not on what it learns a step' if abs(mean) <= 2 else
           'so it trails on what it learns a step as well as on time')
    return text + f"; at equal steps its training loss is {mean:+.1f} % of `nn.Transformer`'s, {why}."


def translation_examples(r, names, n=3, min_words=6):
    """Three test sentences of the curve, chosen by ours reversible's sentence chrF (its best,
    its middle and its worst among sentences of min_words words or more, or among all if fewer
    than three are that long), with every model's output."""
    pairs = r.get('curve_pairs')
    if not pairs or not all('curve_hypotheses' in r['models'][k] for k in names):
        return []
    from sacrebleu.metrics import CHRF
    chrf = CHRF()
    hyps = r['models'][names[0]]['curve_hypotheses']
    long = [i for i, (src, _) in enumerate(pairs) if len(src.split()) >= min_words]
    among = (f"of the {len(long)} with {min_words} words or more" if len(long) >= n
             else f"of all {len(pairs)}")
    ranked = sorted(long if len(long) >= n else range(len(pairs)),
                    key=lambda i: -chrf.sentence_score(hyps[i], [pairs[i][1]]).score)
    picks = [ranked[0], ranked[len(ranked) // 2], ranked[-1]][:n]
    lines = ['', f"Three of those test sentences, chosen by the sentence chrF of ours "
                 f"reversible (its best, its middle and its worst {among}), and what each model "
                 f"made of them:", '', '| | ' + ' | '.join(
                     f"{w}" for w in ('best', 'middle', 'worst')[:len(picks)]) + ' |',
             '|---|' + '---|' * len(picks)]
    cell = lambda text: text.replace('|', '\\|')
    lines.append('| source | ' + ' | '.join(cell(pairs[i][0]) for i in picks) + ' |')
    lines.append('| reference | ' + ' | '.join(cell(pairs[i][1]) for i in picks) + ' |')
    for k in names:
        lines.append(f"| {TRANSLATION_NAMES[k]} | " + ' | '.join(
            cell(r['models'][k]['curve_hypotheses'][i]) for i in picks) + ' |')
    return lines


def wrapped(block, width=100):
    """block with its prose lines wrapped at width (tables and images stay one line each)."""
    out = []
    for line in block.split('\n'):
        keep = line.startswith(('|', '![')) or len(line) <= width
        out += [line] if keep else textwrap.wrap(line, width, break_on_hyphens=False,
                                                 break_long_words=False)
    return '\n'.join(out)


def between(text, start, end, block, readme):
    """text with block between the markers start and end; a clear error if they are missing."""
    a, b = text.find(start), text.find(end)
    if a < 0 or b < a:
        raise SystemExit(f"error: {readme} has no '{start}' ... '{end}' markers; add them where "
                         f"that section goes")
    return text[:a + len(start)] + '\n' + block + text[b:]


def write_readme(readme='README.md', results='experiments/results', results_md=None,
                 bench='experiments/bench_results'):
    """Write the full results to results_md (default: RESULTS.md beside the results folder, so
    experiments/RESULTS.md) and, between the README's markers, the verdicts and a link to it;
    error if the markers are missing. Returns the README's new text."""
    with open(readme) as f:
        text = f.read()
    between(text, MARK_START, MARK_END, '', readme)   # fail before writing anything
    between(text, BENCH_START, BENCH_END, '', readme)
    loaded = load_results(results)
    for name, result in loaded.items():   # the plots, redrawn from the same files
        plot(result, os.path.join(results, f'{name}.png'))
    results_md = results_md or os.path.join(os.path.dirname(os.path.abspath(results)), 'RESULTS.md')
    with open(results_md + '.tmp', 'w') as f:
        f.write('# Results, reproduced at CPU scale\n\n' + readme_section(loaded))
    os.replace(results_md + '.tmp', results_md)
    link = os.path.relpath(results_md, os.path.dirname(os.path.abspath(readme)))
    block = "\n".join(["Generated by `python -m experiments.report` from the JSON; do not edit "
                        "by hand."] + [''] + verdicts_table(loaded) +
                       ['', f"Every experiment in full, with its data, scale, tables, plots and "
                            f"runs: [{link}]({link})."]) + '\n'
    new = between(text, MARK_START, MARK_END, wrapped(block), readme)
    bench_link = os.path.relpath(os.path.abspath(bench), os.path.dirname(os.path.abspath(readme)))
    new = between(new, BENCH_START, BENCH_END, wrapped(bench_block(bench, bench_link)), readme)
    with open(readme + '.tmp', 'w') as f:
        f.write(new)
    os.replace(readme + '.tmp', readme)
    write_decode_table(os.path.join(os.path.dirname(os.path.abspath(readme)), 'translation',
                                    'README.md'), bench, results)
    return new


def write_decode_table(path, bench, results='experiments/results'):
    """translation/README.md's generated blocks (the decoding table, checkpoint averaging, the
    bare run, the side-by-side comparison), between their markers, where it has them."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        text = f.read()
    here = os.path.dirname(os.path.abspath(path))
    link = lambda folder: os.path.relpath(os.path.abspath(folder), here)
    blocks = [(DECODE_START, DECODE_END, decode_block, bench),   # (markers, maker, its folder)
              (AVERAGING_START, AVERAGING_END, averaging_block, results),
              (PARALLEL_START, PARALLEL_END, parallel_small_block, results)] + [
              (f'<!-- {name}:start -->', f'<!-- {name}:end -->',
               functools.partial(translation_block, name=name), results)
              for name in TRANSLATION_RUNS]
    new = text
    for start, end, block, folder in blocks:
        if start in text:
            new = between(new, start, end, wrapped(block(folder, link(folder))), path)
    with open(path + '.tmp', 'w') as f:
        f.write(new)
    os.replace(path + '.tmp', path)


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split('\n\n')[0])
    p.add_argument('--results', default='experiments/results', help='where NAME.json lives')
    p.add_argument('--readme', default='README.md', help='the README whose blocks are rewritten')
    p.add_argument('--bench', default='experiments/bench_results', help="bench.py's JSON")
    a = p.parse_args(argv)
    write_readme(a.readme, a.results, bench=a.bench)
    print(f"wrote {os.path.join(os.path.dirname(os.path.abspath(a.results)), 'RESULTS.md')} and "
          f"{a.readme}'s results and bench blocks from {a.results}/*.json")


if __name__ == '__main__':
    main()
