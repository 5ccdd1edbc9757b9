"""Tests for reproduce.py on tiny runs: the results file holds every run (failed ones too) with
its config, command, wall time, metrics and curve; a second call skips finished runs and resumes an
interrupted one from its checkpoint; the README section is generated from the results and only
between the markers; the corpus is prepared deterministically.

    python -m pytest tests/test_reproduce.py      # a few seconds on 2 CPU cores

The runs call train.main in-process (through reproduce.subprocess_train, replaced here) for
speed; one test runs the real subprocess.
"""
import contextlib
import json
import os
import shutil

import pytest

import experiments.report as report
import experiments.reproduce as reproduce
import train

TINY = ['--dataset=duplication', '--device=cpu', '--seq_len=16', '--vocab_size=8',
        '--n_layers=1', '--d_model=16', '--n_heads=2', '--d_ff=16', '--bucket_size=4',
        '--batch_size=4', '--valid_size=8', '--warmup=1', '--max_steps=4', '--eval_interval=2',
        '--log_interval=1', '--pos_emb=absolute']

EXP = dict(title='tiny Table 2', task='duplication', base=TINY, seeds=[0, 1],
           paper_base=lambda label: ['@configs/duplication_lsh4.args'],
           variants=[('full', ['--attn=full']), ('LSH-2', ['--attn=lsh', '--n_hashes=2']),
                     ('broken', ['--attn=lsh', '--shared_qk=False'])],
           evals=lambda label: [('full', ['--eval_attn=full']),
                                ('LSH-8', ['--eval_attn=lsh', '--eval_n_hashes=8'])])


def in_process(calls):
    """A stand-in for reproduce.subprocess_train that runs train.main in this process."""
    def run(argv, out_dir, log_name, python=None):
        calls.append(argv)
        with open(os.path.join(out_dir, log_name), 'a') as log, \
                contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                train.main(argv)
                rc = 0
            except SystemExit as e:   # train.py's clear errors
                print(e)
                rc = 1
        return rc, 0.01
    return run


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(reproduce.EXPERIMENTS, 'tiny', EXP)
    monkeypatch.setattr(reproduce, 'subprocess_train', in_process(calls))
    monkeypatch.chdir(tmp_path)
    return calls


def test_results_hold_every_run_with_config_command_metrics_and_curve(tiny):
    out = reproduce.run_experiment('tiny')
    saved = json.load(open('experiments/results/tiny.json'))
    assert saved == json.loads(json.dumps(out))
    assert [(r['label'], r['seed']) for r in saved['runs']] == [
        ('full', 0), ('LSH-2', 0), ('broken', 0), ('full', 1), ('LSH-2', 1), ('broken', 1)]
    ok = [r for r in saved['runs'] if r['label'] != 'broken']
    for r in ok:
        assert r['status'] == 'ok' and r['rc'] == 0
        assert f"--seed={r['seed']}" in r['command'] and '--out_dir=' in r['command']
        assert r['config']['attn'] == ('full' if r['label'] == 'full' else 'lsh')
        assert [e['step'] for e in r['curve']['eval']] == [2, 4]
        assert len(r['curve']['train']) == 4
        for label in ('full', 'LSH-8'):
            assert 0 <= r['evals'][label]['accuracy'] <= 1
        assert r['evals']['LSH-8']['eval_n_hashes'] == 8
        assert r['evals']['full']['eval_attn'] == 'full'
        assert isinstance(r['wall_s'], float) and len(r['load_before']) == 3
        assert r['device'] == 'cpu'
    # the failed run is reported, with train.py's message, and the sweep went on past it
    broken = [r for r in saved['runs'] if r['label'] == 'broken']
    assert all(r['status'] == 'failed' and 'shared_qk' in r['error'] and r['evals'] == {}
               for r in broken)
    assert os.path.getsize('experiments/results/tiny.png') > 1000
    # the same seed and flags give the same out_dir; another seed another
    assert ok[0]['out_dir'] != ok[2]['out_dir']


def test_finished_runs_are_skipped_and_interrupted_ones_resumed(tiny):
    reproduce.run_experiment('tiny', seeds=[0])
    n = len(tiny)
    assert n == 2 * 3 + 1   # two trainings with two evals each, one failed training
    first = json.load(open('experiments/results/tiny.json'))
    reproduce.run_experiment('tiny', seeds=[0])
    assert len(tiny) == n   # nothing re-run, not even the evals or the failed run
    assert json.load(open('experiments/results/tiny.json'))['runs'][0]['evals'] == first['runs'][0]['evals']
    # a new checkout has the results but not out/: finished runs are not trained again
    shutil.move('out', 'out.old')
    reproduce.run_experiment('tiny', seeds=[0])
    assert len(tiny) == n + 1   # only the failed run is tried again
    assert json.load(open('experiments/results/tiny.json'))['runs'][0] == first['runs'][0]
    shutil.rmtree('out')
    shutil.move('out.old', 'out')
    n += 1
    # an interrupted run: its checkpoint is there, its run.json (written last) is not
    lsh = first['runs'][1]
    os.remove(os.path.join(lsh['out_dir'], 'run.json'))
    reproduce.run_experiment('tiny', seeds=[0])
    assert len(tiny) == n + 1 and '--resume' in tiny[-1]
    again = json.load(open('experiments/results/tiny.json'))['runs'][1]
    assert again['resumed'] and again['status'] == 'ok'
    assert again['evals'] == lsh['evals']   # the cached evals of the same checkpoint
    # another seed in another call (or process) adds to the file, in (seed, variant) order
    reproduce.run_experiment('tiny', seeds=[1])
    runs = json.load(open('experiments/results/tiny.json'))['runs']
    assert [(r['label'], r['seed']) for r in runs] == [
        ('full', 0), ('LSH-2', 0), ('broken', 0), ('full', 1), ('LSH-2', 1), ('broken', 1)]
    assert runs[1] == again


def test_a_run_two_experiments_share_is_trained_once(tiny, monkeypatch):
    """Another experiment with the same flags and the same evals takes the finished run under
    its own label; one whose evals differ trains it itself."""
    reproduce.run_experiment('tiny', seeds=[0])
    n, first = len(tiny), json.load(open('experiments/results/tiny.json'))['runs'][0]
    monkeypatch.setitem(reproduce.EXPERIMENTS, 'twin', dict(
        EXP, variants=[('full attention', ['--attn=full'])]))
    (run,) = reproduce.run_experiment('twin', seeds=[0])['runs']
    assert len(tiny) == n   # nothing trained or evaluated
    assert run == dict(first, label='full attention', shared_with='tiny')
    monkeypatch.setitem(reproduce.EXPERIMENTS, 'other_evals', dict(
        EXP, variants=[('full attention', ['--attn=full'])],
        evals=lambda label: [('full', ['--eval_attn=full', '--eval_n_hashes=2'])]))
    (run,) = reproduce.run_experiment('other_evals', seeds=[0])['runs']
    assert len(tiny) > n and 'shared_with' not in run


def test_real_subprocess_run(tmp_path, monkeypatch):
    monkeypatch.setitem(reproduce.EXPERIMENTS, 'tiny', dict(EXP, variants=EXP['variants'][:1],
                                                            evals=lambda label: []))
    monkeypatch.chdir(tmp_path)
    out = reproduce.run_experiment('tiny', seeds=[3])
    (run,) = out['runs']
    assert run['status'] == 'ok' and run['wall_s'] > 0, run.get('error')
    assert run['curve']['eval'][-1]['step'] == 4


def lm_result(name, values, task='text'):
    """A results/NAME.json as run_experiment writes it, with given final bpc per label."""
    runs = []
    for label, per_seed in values.items():
        for seed, bpc in enumerate(per_seed):
            ev = [{'step': 50, 'bpc': 3.4, 'time_s': 10.0},     # flat over the last 20 %:
                  {'step': 80, 'bpc': bpc + 0.01, 'time_s': 16.0},   # it has finished
                  {'step': 100, 'bpc': bpc, 'time_s': 20.0}]
            runs.append({'label': label, 'seed': seed, 'status': 'ok', 'wall_s': 21.0,
                         'config': {'max_steps': '100', 'batch_size': '4', 'seq_len': '8'},
                         'load_before': [1.0, 1, 1], 'load_after': [2.0, 2, 2],
                         'curve': {'train': [], 'eval': ev},
                         'evals': {'own': {'bpc': bpc}, 'LSH-8': {'bpc': bpc - 0.01}}})
    return {'experiment': name, 'title': f'{name} title', 'task': task, 'runs': runs,
            'machine': {'cpu': 'CPU', 'cores': 2, 'torch': '2', 'threads': '1'},
            'corpus': {'bytes': 123, 'md5': 'abc'}}


def test_readme_section_is_generated_between_the_markers(tmp_path):
    os.makedirs(tmp_path / 'results')
    qk = lm_result('qk', {'full, separate QK': [2.50, 2.52], 'full, shared QK': [3.20, 3.24]})
    rev = lm_result('reversible', {'ordinary': [2.50, 2.52], 'reversible': [2.51, 2.53]})
    for r in (qk, rev):
        json.dump(r, open(tmp_path / 'results' / f"{r['experiment']}.json", 'w'))
    # another tool's results beside them (compare_translation.py) are left out, not an error
    json.dump({'bleu': 1.0}, open(tmp_path / 'results' / 'translation.json', 'w'))
    readme = tmp_path / 'README.md'
    readme.write_text('# title\nbefore\n## Results (reproduced at CPU scale)\n'
                      f'{report.MARK_START}\nold text\n{report.MARK_END}\n'
                      f'{report.BENCH_START}\n{report.BENCH_END}\nafter\n')
    report.write_readme(str(readme), str(tmp_path / 'results'))
    text = readme.read_text()
    assert text.startswith('# title\nbefore\n## Results') and text.endswith('\nafter\n')
    assert 'old text' not in text
    inside = text.split(report.MARK_START)[1].split(report.MARK_END)[0]
    assert '[RESULTS.md](RESULTS.md)' in inside and '| full, shared QK |' not in inside
    assert '| Shared QK does not hurt | Figure 3 left (enwik8 and imagenet64) |' in inside
    inside = (tmp_path / 'RESULTS.md').read_text()   # the full results, tables and plots
    assert '| full, shared QK | 100 | 3.220 ± 0.020 | never, never | 0.010, 0.010 | 20, 20 |' in inside
    assert '| full, separate QK | 100 | 2.510 ± 0.010 | 63, 64 | 0.010, 0.010 | 20, 20 |' in inside
    assert ('| Shared QK does not hurt | Figure 3 left (enwik8 and imagenet64) | text (Python '
            'docs, 0.0 MB); None layers, d None, T 8, 100 steps | full, shared QK 3.220 bpc, full, '
            'separate QK 2.510: difference +0.710, 95 % interval [+0.583, +0.837] (seeds 0, 1: '
            '+0.700, +0.720) | **does not hold** |') in inside
    assert '| Reversible layers do not hurt (mean join) | Figure 3 right' in inside
    assert '| **holds** | `python -m experiments.reproduce reversible` |' in inside
    assert ('| LSH approaches full attention as hash rounds grow | Figure 4 (imagenet64) | - | - | '
            '**not measured yet** |') in inside
    assert 'python -m experiments.reproduce qk' in inside and 'results/qk.png' in inside
    assert os.path.getsize(tmp_path / 'results' / 'qk.png') > 1000   # redrawn from the file
    # running it again changes nothing: the section replaces itself
    full = inside
    report.write_readme(str(readme), str(tmp_path / 'results'))
    assert readme.read_text() == text and (tmp_path / 'RESULTS.md').read_text() == full


def test_readme_without_markers_is_a_clear_error(tmp_path):
    readme = tmp_path / 'README.md'
    readme.write_text('# no markers\n')
    with pytest.raises(SystemExit, match='results:start'):
        report.write_readme(str(readme), str(tmp_path))
    assert readme.read_text() == '# no markers\n'
    readme.write_text(f'{report.MARK_START}\n{report.MARK_END}\n')   # the bench pair missing
    with pytest.raises(SystemExit, match='bench:start'):
        report.write_readme(str(readme), str(tmp_path))


def test_corpus_is_deterministic_and_says_how_to_install(tmp_path):
    src = tmp_path / 'src'
    (src / 'library').mkdir(parents=True)
    for name, text in (('a.rst.txt', 'alpha'), ('library/b.rst.txt', 'beta'),
                       ('c.rst.txt', 'gamma'), ('skip.html', 'not a source')):
        (src / name).write_text(text)
    out1, out2 = tmp_path / '1.txt', tmp_path / '2.txt'
    reproduce.prepare_corpus(str(out1), str(src))
    reproduce.prepare_corpus(str(out2), str(src))
    text = out1.read_text()
    assert text == out2.read_text()
    assert all(w in text for w in ('alpha', 'beta', 'gamma', '.. file: library/b.rst.txt'))
    assert 'not a source' not in text
    with pytest.raises(SystemExit, match='apt-get install python3.11-doc'):
        reproduce.prepare_corpus(str(tmp_path / '3.txt'), str(tmp_path / 'nowhere'))


def test_window_analysis_on_a_tiny_language_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    corpus = os.path.abspath(reproduce.__file__)   # human-written text: this file's source
    for bucket in (4, 16):
        train.main(['--dataset=text', f'--data_path={corpus}', '--data_dir=d', '--seq_len=32',
                    '--n_layers=2', '--d_model=16', '--n_heads=2', '--d_ff=16',
                    f'--bucket_size={bucket}', '--attn=full', '--shared_qk=True',
                    '--reversible=False', '--batch_size=4', '--max_steps=2', '--eval_interval=2',
                    '--eval_iters=1', f'--out_dir=o{bucket}', '--device=cpu'])
        w = reproduce.analyse_windows(f'o{bucket}', hashes=(1, 4))
        assert set(w) == {'untrained', 'trained'} and set(w['trained']) == {'LSH-1', 'LSH-4'}
        stats = [layer for state in w.values() for per_r in state.values() for layer in per_r]
        assert len(stats) == 2 * 2 * 2
        if bucket == 16:   # T = 2 x bucket: one window holds every key, as in full attention
            assert all(s['mass_in_window'] == pytest.approx(1) and s['prev_in_window'] == 1
                       for s in stats)
        else:              # 8 buckets: LSH-1 sees part of it, 4 rounds see more
            for state in w.values():
                for one, four in zip(state['LSH-1'], state['LSH-4']):
                    assert 0 < one['mass_in_window'] < four['mass_in_window'] < 1
        assert os.path.exists(f'o{bucket}/windows.json')


def test_paper_scale_plans_use_the_config_files_and_parse():
    for name in reproduce.ORDER:
        for label, seed, argv in reproduce.plan(name, paper=True):
            files = [a[1:] for a in argv if a.startswith('@')]
            assert files and all(os.path.exists(os.path.join(reproduce.ROOT, f)) for f in files)
            args = train.parse_args([f'@{os.path.join(reproduce.ROOT, f)}' for f in files]
                                    + [a for a in argv if not a.startswith('@')])
            assert args.seed == seed
            assert (args.dataset == 'duplication') == name.startswith('table2')
    # CPU scale: the sizes stated in the README (sparse LSH: 2 x bucket / T <= 1/4)
    for name in reproduce.ORDER:
        for label, seed, argv in reproduce.plan(name):
            args = train.parse_args(argv)
            assert 2 * args.bucket_size / args.seq_len <= 1 / 4 or 'bucket 64' in label


def test_untrained_windows_are_local_with_sinusoidal_positions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ['--dataset=text', f'--data_path={os.path.abspath(reproduce.__file__)}',
            '--data_dir=d', '--n_layers=1', '--d_model=32', '--n_heads=2', '--d_ff=16',
            '--bucket_size=4', '--reversible=False']
    rows = reproduce.untrained_windows(seq_lens=(64,), hashes=(1, 4), base=base)
    assert [(r['T'], r['pos_emb']) for r in rows] == [(64, 'axial'), (64, 'sinusoidal')]
    axial, sinusoidal = ({h: r[h][0]['prev_in_window'] for h in ('LSH-1', 'LSH-4')} for r in rows)
    # more rounds see more; fixed sinusoids (amplitude 1 against embeddings of 0.02) make
    # neighbours hash together, learned positions of the same size as the tokens do not
    assert axial['LSH-1'] < axial['LSH-4'] and sinusoidal['LSH-1'] <= sinusoidal['LSH-4']
    assert sinusoidal['LSH-1'] > axial['LSH-1']


def test_rerun_with_other_steps_changes_the_numbers_in_the_generated_text(tiny, tmp_path,
                                                                          monkeypatch):
    """The generated text follows the JSON: a rerun of qk with more steps changes the bpc that
    RESULTS.md's table and the README's verdict state."""
    os.makedirs('data')
    with open(reproduce.__file__) as f, open(reproduce.CORPUS, 'w') as g:
        g.write(f.read())   # human-written text: this module's source
    lm = ['--dataset=text', f'--data_path={reproduce.CORPUS}', '--data_dir=data', '--device=cpu',
          '--seq_len=32', '--n_layers=1', '--d_model=16', '--n_heads=2', '--d_ff=16',
          '--bucket_size=4', '--batch_size=4', '--eval_interval=1', '--eval_iters=1',
          '--attn=full', '--shared_qk=False', '--reversible=False', '--lr=1e-2']
    monkeypatch.setitem(reproduce.EXPERIMENTS, 'qk', dict(reproduce.EXPERIMENTS['qk'], base=lm,
                                                          seeds=[0]))
    readme = tmp_path / 'README.md'
    readme.write_text(f'{report.MARK_START}\n{report.MARK_END}\n'
                      f'{report.BENCH_START}\n{report.BENCH_END}\n')
    texts = []
    for steps in (1, 6):
        out = reproduce.run_experiment('qk', steps=steps)
        shared = next(r for r in out['runs'] if r['label'] == 'full, shared QK')
        bpc = f"{shared['evals']['own']['bpc']:.3f}"
        report.write_readme(str(readme), 'experiments/results')
        full = open('experiments/RESULTS.md').read()
        assert f"| full, shared QK | {steps} | {bpc} |" in full
        assert f"full, shared QK {bpc} bpc" in readme.read_text()
        texts.append((bpc, full, readme.read_text()))
    (bpc1, full1, readme1), (bpc6, full6, readme6) = texts
    assert bpc1 != bpc6 and bpc1 not in readme6 and "| full, shared QK | 1 |" not in full6


def test_paired_verdicts_give_the_interval_and_follow_the_rule():
    """'does not hurt' from per-seed differences and a 95 % t interval (3 seeds: t = 4.303)."""
    def verdict(other, base=(2.0, 2.1, 2.2), last_drop=0.0):
        r = lm_result('reversible', {'ordinary': list(base), 'reversible': list(other)})
        for run in r['runs']:   # the eval at 80 % of the steps, `last_drop` above the final one
            run['curve']['eval'][1]['bpc'] = run['curve']['eval'][2]['bpc'] + last_drop
        return report.no_worse_verdict(r, 'ordinary', 'reversible', 'claim', 'paper')[2:4]
    ours, word = verdict([2.01, 2.12, 2.20])           # diffs +0.01, +0.02, 0: sd 0.01
    assert word == 'not settled: the interval straddles +0.03'
    half = 4.303 * 0.01 / 3 ** 0.5
    assert f'95 % interval [{0.01 - half:+.3f}, {0.01 + half:+.3f}]' in ours
    assert 'seeds 0, 1, 2: +0.010, +0.020, +0.000' in ours
    assert verdict([2.005, 2.105, 2.205])[1] == 'holds'              # interval [+0.005, +0.005]
    assert verdict([2.1, 2.2, 2.3])[1] == 'does not hold'            # [+0.1, +0.1]
    assert verdict([2.1], base=[2.0])[1] == 'not settled: one seed'
    # a run still falling more than 0.03 bpc over its last 20 % of steps settles nothing
    assert verdict([2.005, 2.105, 2.205], last_drop=0.05)[1] == (
        'not settled: 6 of 6 runs still learning at the end, falling 0.050-0.050 bpc over the '
        'last 20 % of steps')
    assert verdict([2.005, 2.105, 2.205], last_drop=0.02)[1] == 'holds'
    # a pair is two runs of one recipe: a seed whose runs differ in max_steps is left out
    r = lm_result('reversible', {'ordinary': [2.0, 2.1, 2.2], 'reversible': [2.1, 2.2, 2.25]})
    r['runs'][0]['config'] = dict(r['runs'][0]['config'], max_steps='2400')   # ordinary seed 0
    p = report.paired_difference(r, 'ordinary', 'reversible')
    assert p['seeds'] == [1, 2] and p['diffs'] == pytest.approx([0.1, 0.05])


def test_gap_drift_reads_the_paired_gap_at_80_percent_and_at_the_end():
    """The gap at 80 % of the steps and at the end, per seed then averaged; whether it shrank."""
    r = lm_result('reversible', {'ordinary': [2.0, 2.1], 'reversible': [2.05, 2.17]})
    # lm_result's evals: step 80 at bpc + 0.01, step 100 at bpc. Move reversible's step-80 eval
    # so that its gap there is +0.10 (seed 0) and +0.12 (seed 1): it shrinks to +0.05, +0.07.
    for run in r['runs']:
        if run['label'] == 'reversible':
            run['curve']['eval'][1]['bpc'] = (2.01 + 0.10, 2.11 + 0.12)[run['seed']]
    g = report.gap_drift(r, 'ordinary', 'reversible')
    assert g['seeds'] == [0, 1]
    assert g['then'] == pytest.approx(0.11) and g['end'] == pytest.approx(0.06)
    text = report.gap_drift_sentence(r, 'ordinary', ['reversible'])[0]
    assert 'reversible +0.110 at 80 % of the steps, +0.060 at the end (shrank)' in text
    assert 'may be a delay' in text
    # the same gap at both points: held, and no delay
    r = lm_result('reversible', {'ordinary': [2.0, 2.1], 'reversible': [2.05, 2.17]})
    text = report.gap_drift_sentence(r, 'ordinary', ['reversible'])[0]
    assert '+0.060 at 80 % of the steps, +0.060 at the end (held)' in text
    assert 'not delays' in text
    # 80 % between two evals is read linearly: step 80 of 0..100 with evals at 50 and 100
    run = r['runs'][0]
    run['curve']['eval'] = [{'step': 50, 'bpc': 3.0}, {'step': 100, 'bpc': 2.0}]
    assert report.bpc_at_fraction(run, 0.8) == pytest.approx(2.4)


def table2_result(acc):
    """A results/table2.json with {label: {eval: accuracy}} for one seed and a curve."""
    runs = [{'label': label, 'seed': 0, 'status': 'ok',
             'config': {'vocab_size': '16', 'seq_len': '128', 'bucket_size': '16'},
             'curve': {'eval': [{'step': s, 'accuracy': a} for s, a in
                                ((100, 0.3), (200, 0.5), (300, 0.503), (400, 0.506))]},
             'evals': {k: {'accuracy': v} for k, v in evals.items()}} for label, evals in acc.items()]
    return {'experiment': 'table2', 'task': 'duplication', 'runs': runs}


def test_table2_collapse_under_the_authors_attention_and_which_convention():
    low, high = 0.05, 0.97          # chance is 1/15 = 6.7 %; twice chance counts as at chance
    conv = lambda dot, scaled, self_, raw: {'full_dot': dot, 'full_scaled': scaled,
                                            'full_self': self_, 'full_raw_keys': raw}
    r = table2_result({'full': {'full': 1.0, 'LSH-4': 0.9, **conv(low, 0.99, low, 0.99)},
                       'full_dot': {'full': 0.9, **conv(0.99, 0.99, 0.99, 0.99)},
                       'LSH-2': {'full': 0.8, 'LSH-2': 0.95, **conv(low, high, low, high)},
                       'LSH-4': {'full': 0.7, 'LSH-4': 0.96, **conv(low, high, low, high)}})
    assert report.table2_verdict(r)[3] == 'does not hold'          # ours: no collapse
    claim, paper, ours, word, _ = report.table2_verdict(r, 'full_dot')
    assert word == 'holds' and 'LSH-2 5.0 %, LSH-4 5.0 % under full_dot' in ours
    assert 'the model trained with full_dot: 99.0 %' in ours   # not 'full' (at chance here)
    text = report.conventions_sentence(r)
    assert 'Alone, full_self brings every LSH-trained model to chance.' in text
    assert ('Of the three alone, full_self does the most: the LSH-trained models average '
            '5.0 %') in text
    assert "This accounts for the paper's 0.8 %" in text
    r['runs'][1]['evals']['full_dot'] = {'accuracy': 0.5}    # the full_dot-trained model fails
    assert "accounts for" not in report.conventions_sentence(r)
    r['runs'][1]['evals']['full_dot'] = {'accuracy': 0.99}
    r['runs'][1]['evals']['full_dot'] = {'accuracy': low}   # the full_dot-trained one falls too
    assert report.table2_verdict(r, 'full_dot')[3] == (
        'holds, but the model trained with full_dot falls too')
    r['runs'][2]['evals']['full_dot'] = {'accuracy': high}
    assert report.table2_verdict(r, 'full_dot')[3].startswith('partly: LSH-4 only')
    # runs below 99 %: stuck since the step after which accuracy never rose by a point
    stuck = 'at 50.6 % (stuck: no gain above 1 point after step 200)'
    assert report.stuck_sentence(r) == (
        f'Runs below 99 % at the end: full seed 0 {stuck}; full_dot seed 0 {stuck}; '
        f'LSH-2 seed 0 {stuck}; LSH-4 seed 0 {stuck}.')
    r['runs'][0]['curve']['eval'][-1]['accuracy'] = 0.6
    assert 'full seed 0 at 60.0 % (still improving at the last step)' in report.stuck_sentence(r)


def test_table2_collapse_counts_only_lsh_models_that_learned_the_task():
    """An LSH model below half its accuracy under its own attention never learned the task: its
    low score under full_dot is no collapse."""
    low = 0.05
    r = table2_result({'full_dot': {'full_dot': 0.99},
                       'LSH-2': {'LSH-2': 0.95, 'full_dot': low},
                       'LSH-4': {'LSH-4': 0.30, 'full_dot': low}})
    _, _, ours, word, _ = report.table2_verdict(r, 'full_dot')
    assert word == 'holds (LSH-4 never learned the task, so not counted)'
    assert 'LSH-4 30.0 % under their own attention' in ours
    r['runs'][1]['evals']['full_dot'] = {'accuracy': 0.9}    # the learned one does not fall
    assert report.table2_verdict(r, 'full_dot')[3].startswith('does not hold')
    r['runs'][1]['evals']['LSH-2'] = {'accuracy': 0.2}       # neither learned
    assert report.table2_verdict(r, 'full_dot')[3] == 'not settled: no LSH model learned the task'


def test_hashes_suspects_are_named_by_their_paired_intervals():
    r = lm_result('hashes', {'LSH-4': [2.30, 2.32, 2.34], 'LSH-4, dedup': [2.20, 2.23, 2.24],
                             'local + LSH-4': [2.31, 2.31, 2.36]})
    text = report.suspects_sentence(r)
    assert 'dedup at 4 rounds: difference -0.097' in text        # -0.10, -0.09, -0.10
    assert 'The numbers point to dedup at 4 rounds.' in text     # local's interval holds zero
    assert 'Against full attention' not in text                  # full attention not run
    r = lm_result('hashes', {'LSH-4': [2.30, 2.32, 2.34], 'local + LSH-4': [2.20, 2.23, 2.24],
                             'full, shared QK': [2.25, 2.27, 2.29]})
    text = report.suspects_sentence(r)
    assert 'The numbers point to a local layer below LSH-4' in text
    assert ('local + LSH-4 is below full attention: the whole interval under zero: difference '
            '-0.047' in text)                                    # -0.05, -0.04, -0.05
    r['runs'][-1]['evals']['own']['bpc'] = 2.20                  # seed 2 of full: -0.04
    assert 'is not told apart from full attention' in report.suspects_sentence(r)
    r = lm_result('hashes', {'LSH-4': [2.30, 2.32, 2.34], 'LSH-4, dedup': [2.31, 2.33, 2.34]})
    assert report.suspects_sentence(r).endswith(
        'No fix lowers bpc with its whole interval below zero.')


def test_decode_table_is_generated_from_decode_json(tmp_path):
    rows = [{'impl': impl, 'length': 64, 'batch': 16, 'cpu_seconds': s, 'seconds': 2 * s,
             'cpu_tokens_per_s': 1024 / s, 'tokens_per_s': 512 / s}
            for impl, s in (('ours, greedy', 1.0), ('ours, greedy, recompute', 8.0),
                            ('ours, beam 4', 2.0), ('marian, greedy', 1.5),
                            ('marian, beam 4', 3.0))]
    json.dump({'argv': ['decode'], 'date': '2026-01-01T00', 'code': 'abc', 'device': 'CPU',
               'load_at_start': [1.0, 1, 1], 'n_layers': 3, 'd_model': 256, 'vocab_size': 8000,
               'd_ff': 1024, 'src_len': 32, 'rows': rows}, open(tmp_path / 'decode.json', 'w'))
    (tmp_path / 'translation').mkdir()
    readme = tmp_path / 'translation' / 'README.md'
    readme.write_text(f'before\n{report.DECODE_START}\nold\n{report.DECODE_END}\nafter\n')
    report.write_decode_table(str(readme), str(tmp_path))
    text = readme.read_text()
    assert 'old' not in text and text.startswith('before\n') and text.endswith('after\n')
    assert '| ours, greedy | 1.00 | 1,024 | 512 |' in text
    assert '1.50x greedy, 1.50x with beam' in text and 'prefix: 8.00x' in text
    assert 'floor' not in text                   # a decode.json from before the floor was measured
    rows[0].update(floor_s=1.6, of_floor=1.25)   # ours 2 s wall; recompute 16 s: 10x is 1.6 s
    record = {**json.load(open(tmp_path / 'decode.json')), 'rows': rows,
              'stream_bytes_per_s': 2 ** 30}
    json.dump(record, open(tmp_path / 'decode.json', 'w'))
    report.write_decode_table(str(readme), str(tmp_path))
    text = ' '.join(readme.read_text().split())
    assert ('1,638 MB over the 64 steps, at least 1.600 s at the 1.1 GB/s' in text and
            'Ours takes 2.000 s' in text and '1.25x that floor' in text and
            '(16.000 s) needs 1.600 s, 1.00x the floor' in text)


def test_each_corpus_comparison_fills_its_own_block(tmp_path):
    """translation/README.md has one block per compare_translation.py file: each names its own
    JSON, and a missing file says which command writes it instead of reusing another's."""
    (tmp_path / 'translation').mkdir()
    readme = tmp_path / 'translation' / 'README.md'
    readme.write_text(''.join(f'<!-- {n}:start -->\nold\n<!-- {n}:end -->\n'
                              for n in report.TRANSLATION_RUNS))
    report.write_decode_table(str(readme), str(tmp_path / 'bench'), str(tmp_path))
    text = readme.read_text()
    assert 'old' not in text
    for name in report.TRANSLATION_RUNS:
        start, end = text.index(f'<!-- {name}:start -->'), text.index(f'<!-- {name}:end -->')
        assert f'--out=../{name}.json' in text[start:end]


TINY_PARALLEL = ['--device=cpu', '--n_layers=1', '--n_dec_layers=1', '--d_model=16',
                 '--n_heads=2', '--d_ff=32', '--max_tokens=96', '--warmup=2', '--log_interval=1',
                 '--eval_interval=2', '--valid_size=4', '--heldout=4', '--tokenizer=bytes',
                 '--seq_len=24', '--max_steps=4']


def tiny_parallel(tmp_path, monkeypatch):
    """A tiny corpus in tmp_path/data and train.py run in-process: (calls, extra flags)."""
    calls = []
    monkeypatch.setattr(reproduce, 'subprocess_train', in_process(calls))
    monkeypatch.chdir(tmp_path)
    os.makedirs('data')
    with open('data/pairs.tsv', 'w', encoding='utf-8') as f:
        f.writelines(f"the {w} house {i}\tdas {w} Haus {i}\n" for i in range(12)
                     for w in ('red', 'big', 'old'))
    return calls, TINY_PARALLEL


def test_parallel_small_times_the_bare_command_and_scores_the_test_part(tmp_path, monkeypatch):
    """The bare translation command (here shrunk by extra flags), timed and resumable, then
    translate --eval on ckpt_best.pt; the results file and the README block come from it."""
    calls, tiny = tiny_parallel(tmp_path, monkeypatch)
    out = reproduce.parallel_small('data/pairs.tsv', 'out', 'results', extra=tiny)
    assert calls[0][:2] == ['--dataset=parallel', '--data_path=data/pairs.tsv']
    assert out['command'].startswith('python train.py --dataset=parallel --data_path=data/pairs')
    assert out['steps'] == 4 and out['data']['pairs'] == 36
    assert [e['step'] for e in out['curve']['eval']] == [2, 4]
    assert out['best']['nll'] == min(e['nll'] for e in out['curve']['eval'])
    assert out['test']['n_sentences'] == 4 and out['test']['beam_size'] == 4
    assert out['test']['checkpoint'].endswith('ckpt_best.pt') and out['test']['eval_wall_s'] >= 0
    assert json.load(open('results/parallel_small.json')) == json.loads(json.dumps(out))
    # a second call trains nothing and scores nothing again
    assert reproduce.parallel_small('data/pairs.tsv', 'out', 'results', extra=tiny) == out
    assert len(calls) == 1
    block = report.parallel_small_block('results', 'results')
    assert f"**sacreBLEU {out['test']['bleu']:.2f}**" in block
    assert 'the target, under about an hour, is **met**' in block
    out['train']['wall_s'] = 3700.0
    json.dump(out, open('results/parallel_small.json', 'w'))
    assert '**not met**' in report.parallel_small_block('results', 'results')
    with pytest.raises(SystemExit, match='translation.translation_data --dataset=bible'):
        reproduce.parallel_small('data/missing.tsv', 'out', 'results')


def test_averaging_continues_the_bare_run_and_scores_three_checkpoints(tmp_path, monkeypatch):
    calls, tiny = tiny_parallel(tmp_path, monkeypatch)
    with pytest.raises(SystemExit, match='reproduce parallel_small. first'):
        reproduce.averaging('data/pairs.tsv', 'out', 'results', extra=tiny)
    reproduce.parallel_small('data/pairs.tsv', 'out', 'results', extra=tiny)
    flags = ['--max_steps=8', '--eval_interval=2', '--average_last=2']
    out = reproduce.averaging('data/pairs.tsv', 'out', 'results', extra=tiny, flags=flags)
    assert '--resume' in calls[1] and '--max_steps=8' in calls[1]   # continued, not restarted
    assert [e['step'] for e in out['evals']] == [2, 4, 6, 8]
    c = out['checkpoints']
    assert c['last']['step'] == 8 and c['avg']['averaged_steps'] == [6, 8]
    assert c['best']['valid_nll'] == pytest.approx(min(e['nll'] for e in out['evals']))
    assert c['last']['valid_nll'] == pytest.approx(out['evals'][-1]['nll'])
    assert c['avg']['valid_nll'] not in (c['last']['valid_nll'], c['best']['valid_nll'])
    # the original run is untouched: its log still ends at step 4
    assert max(r['step'] for r in reproduce.read_jsonl('out/parallel_small/log.jsonl')) == 4
    n = len(calls)
    assert reproduce.averaging('data/pairs.tsv', 'out', 'results', extra=tiny, flags=flags) == out
    assert len(calls) == n                                   # nothing trained or scored again
    block = report.averaging_block('results', 'results')
    assert f"| average (`ckpt_avg.pt`) | 6, 8 | {c['avg']['valid_nll']:.3f} |" in block
    d = c['avg']['bleu'] - c['best']['bleu']
    assert f"{d:+.2f} BLEU" in block


def test_each_run_keeps_the_machine_it_ran_on(tmp_path, monkeypatch):
    monkeypatch.setitem(reproduce.EXPERIMENTS, 'tiny', EXP)
    path = str(tmp_path / 'tiny.json')
    a = {'cpu': 'CPU A', 'cores': 2, 'torch': '2', 'threads': '1'}
    b = dict(a, cpu='CPU B')
    header = lambda m: {'experiment': 'tiny', 'scale': 'cpu', 'machine': m}
    run = lambda label, seed, **kw: {'label': label, 'seed': seed, 'status': 'ok', **kw}
    reproduce.save_run(path, header(a), run('full', 0))          # an older file: header only
    out = reproduce.save_run(path, header(b), run('full', 1, machine=b))
    assert [r['machine']['cpu'] for r in out['runs']] == ['CPU A', 'CPU B']
    assert out['machine']['cpu'] == 'CPU B'
    assert report.machines_text(out) == ('CPU A, 2 cores, torch 2, OMP_NUM_THREADS=1 (1 run) '
                                         'and CPU B, 2 cores, torch 2, OMP_NUM_THREADS=1 (1 run)')
    out['runs'][0]['machine'] = b
    assert report.machines_text(out) == 'CPU B, 2 cores, torch 2, OMP_NUM_THREADS=1'


def test_runs_line_names_each_recipe_while_a_rerun_is_part_way():
    """A file holding runs of an old and a new recipe says which runs follow which, not the
    first run's recipe for all of them."""
    r = lm_result('hashes', {'full, shared QK': [2.5, 2.6], 'LSH-4': [2.7]})
    line = report.runs_line(r)
    assert line.startswith('3 run(s), seeds [0, 1], steps of 4 x 8 tokens, lr None (constant '
                           'after None warmup steps), 0 failed;')   # one recipe: no counts
    r['runs'][0]['config'] = dict(r['runs'][0]['config'], max_steps='4800', lr_schedule='cosine',
                                  eval_iters='32')
    line = report.runs_line(r)
    assert ('(cosine decay to 10 % after None warmup steps), train-time evals on 32 fixed '
            'batches (1,024 tokens) (1 run, 4800 steps); ') in line
    assert '(constant after None warmup steps) (2 runs, 100 steps)' in line


def test_join_sentence_says_which_join_the_paired_interval_favours():
    def says(concat):
        r = lm_result('reversible', {'reversible': [2.0, 2.1, 2.2], 'reversible, concat': concat})
        return report.join_sentence(r)[0]
    assert 'the concatenation is the better join' in says([1.96, 2.05, 2.17])   # -0.04 +- 0.01
    assert 'concat is lower on every seed' in says([1.96, 2.05, 2.17])
    assert 'the mean is the better join' in says([2.04, 2.15, 2.23])
    assert 'does not separate' in says([1.9, 2.15, 2.2])
    assert 'lower on some seeds only' in says([1.9, 2.15, 2.2])


def test_trails_sentence_says_whether_reversible_trails_on_time_or_per_step():
    r = {'models': {'reformer': {'steps': 600, 'train_seconds': 1200.0},
                    'transformer': {'steps': 800, 'train_seconds': 1200.0}},
         'equal': {'step': {'at': [100, 200], 'reformer': [5.0, 4.04],
                            'transformer': [5.0, 4.0]}}}
    s = report.trails_sentence(r)
    assert "made 600 steps to `nn.Transformer`'s 800 (25 % fewer: 2.00 against 1.50 s" in s
    assert "loss is +0.5 % of `nn.Transformer`'s, so it trails on time, not on" in s
    r['equal']['step']['reformer'] = [5.5, 4.4]   # 10 % above at both points
    assert 'is +10.0 %' in report.trails_sentence(r)
    assert 'as well as on time' in report.trails_sentence(r)


def test_self_key_suspect_is_named_by_its_interval_and_the_share_of_the_gap_it_closes():
    sep, shared = [1.80, 1.82, 1.81], [1.95, 1.97, 1.96]
    r = lm_result('qk', {'full, separate QK': sep, 'full, shared QK': shared,
                         report.SELF_ALLOWED: [1.83, 1.86, 1.84]})
    text = report.self_key_sentence(r)
    assert 'self allowed - shared QK difference -0.117' in text       # -0.12, -0.11, -0.12
    assert 'shared - separate over the same seeds is +0.150, so allowing it closes 78 %' in text
    assert '**pointed to**' in text
    r = lm_result('qk', {'full, separate QK': sep, 'full, shared QK': shared,
                         report.SELF_ALLOWED: [1.96, 1.95, 1.97]})   # one up, one down, one up
    assert '**not pointed to**' in report.self_key_sentence(r)
    r = lm_result('qk', {'full, separate QK': sep, 'full, shared QK': shared,
                         report.SELF_ALLOWED: [2.12, 2.09, 2.11]})   # worse with every seed
    text = report.self_key_sentence(r)
    assert '**ruled out: allowing it makes shared QK worse**' in text
    assert 'Cauchy-Schwarz' in text and 'closes' not in text
    r = lm_result('qk', {'full, separate QK': sep, 'full, shared QK': shared,
                         report.SELF_ALLOWED: [1.83]})
    assert '**one seed: a direction, not a verdict**' in report.self_key_sentence(r)
    assert 'not run yet' in report.self_key_sentence(lm_result('qk', {'full, shared QK': shared}))


def test_hashes_verdict_part_way_reports_the_rounds_that_pair_and_names_the_rest():
    r = lm_result('hashes', {'full, shared QK': [1.94, 1.95], 'LSH-4': [2.01, 2.05]})
    claim, paper, ours, word, cmd = report.hashes_verdict(r)
    assert ours.startswith('LSH-4 - full (shared QK): difference +0.085')
    assert word == 'not settled: LSH-1, LSH-2, LSH-8 not run with this recipe yet'
    assert report.hashes_verdict(lm_result('hashes', {'LSH-4': [2.0]}))[3] == 'not measured yet'
    # every round present, but LSH-1 and LSH-2 still from the old, shorter recipe: not mixed in
    r = lm_result('hashes', {'full, shared QK': [1.94, 1.95], 'LSH-1': [3.1, 3.1],
                             'LSH-2': [2.8, 2.9], 'LSH-4': [2.01, 2.05], 'LSH-8': [1.98, 2.01]})
    for run in r['runs']:
        if run['label'] in ('LSH-1', 'LSH-2'):
            run['config'] = {**run['config'], 'max_steps': '50'}
    claim, paper, ours, word, cmd = report.hashes_verdict(r)
    assert word == 'not settled: LSH-1, LSH-2 not run with this recipe yet'
    assert 'LSH-1' not in ours and 'LSH-8 - full (shared QK): difference +0.050' in ours
    for run in r['runs']:
        run['config']['max_steps'] = '100'
    assert report.hashes_verdict(r)[2].startswith('LSH-1 3.100, LSH-2 2.850, LSH-4 2.030')
