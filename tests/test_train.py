"""Tests for train.py: flags and @file configs, clear errors, exact resume, the NaN stop, --eval_only
with other attention (Table 2), the byte datasets' full-split bits per character, and one real
2-process torchrun (gloo, CPU) whose ranks must end with identical parameters.

    python -m pytest tests/test_train.py          # about a minute on 2 CPU cores

Most runs call train.main(argv) in-process with a tiny model, for speed; the torchrun test is a
real subprocess.
"""
import dataclasses
import glob
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import flags
import train
from model import ModelConfig, ReformerLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny LSH Reformer on the duplication task: a step takes milliseconds.
TINY = ['--device=cpu', '--seq_len=32', '--vocab_size=8', '--n_layers=2', '--d_model=16',
        '--n_heads=2', '--d_ff=32', '--bucket_size=4', '--n_hashes=2', '--batch_size=4',
        '--valid_size=8', '--warmup=2', '--lr=3e-3', '--log_interval=1', '--eval_interval=2']


def run(tmp_path, *flags, out='out'):
    return train.main(TINY + [f'--out_dir={tmp_path / out}', *flags])


def read_log(path):
    return [json.loads(line) for line in open(path)]


def errors(argv, capsys):
    """The message of the SystemExit that main(argv) raises (argparse prints to stderr)."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    return str(e.value.code) + capsys.readouterr().err


# ----------------------------------------------------------------------------- flags

def test_model_flags_are_the_config_fields():
    args = train.parse_args([])
    for f in dataclasses.fields(ModelConfig):
        assert hasattr(args, f.name)
        assert f.metadata.get('help'), f"--{f.name} needs a help= naming what it ablates"
    assert all(a.help for a in flags.build_parser()._actions), 'every flag needs a help='
    assert train.model_config(args).attn == 'lsh'   # the default run is an LSH Reformer
    assert args.max_seq_len == args.seq_len and args.vocab_size == flags.ModelConfig.vocab_size


@pytest.mark.parametrize('flag, value', [('--reversible', True), ('--reversible=True', True),
                                         ('--reversible=False', False), ('--reversible=0', False),
                                         ('--dedup', True), ('--tie_weights=no', False)])
def test_boolean_flags(flag, value):
    args = train.parse_args([flag])
    assert getattr(args, flag[2:].split('=')[0]) is value


def test_bad_boolean_names_the_value(capsys):
    assert "'maybe'" in errors(['--reversible=maybe'], capsys)


def test_configs_parse():
    files = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.args')))
    assert files, 'configs/*.args should hold the paper experiments'
    for path in files:   # a user's corpus is named on the command line
        corpus = ['--data_path=pairs.tsv'] if '--dataset=parallel' in open(path).read() else []
        args = train.parse_args([f'@{path}', *corpus])
        train.model_config(args).validate()


def test_args_file_comments_and_override(tmp_path):
    path = tmp_path / 'x.args'
    path.write_text('# a comment\n--n_hashes=8   # LSH-8\n\n--attn_pattern=local,lsh --reversible=False\n')
    args = train.parse_args([f'@{path}', '--n_hashes=2'])
    assert (args.n_hashes, args.attn_pattern, args.reversible) == (2, 'local,lsh', False)


def test_lr_schedules():
    a = train.parse_args(['--lr=1.0', '--warmup=10', '--max_steps=110'])
    assert train.get_lr(5, a) == 0.5 and train.get_lr(10, a) == 1.0 and train.get_lr(110, a) == 1.0
    a.lr_schedule = 'rsqrt'
    assert train.get_lr(10, a) == 1.0 and math.isclose(train.get_lr(40, a), 0.5)
    a.lr_schedule = 'cosine'
    assert math.isclose(train.get_lr(60, a), 0.55) and math.isclose(train.get_lr(110, a), 0.1)


@pytest.mark.parametrize('flags, message', [
    (['--dataset=enwik8', '--vocab_size=128'], 'must be 258'),
    (['--batch_size=10', '--grad_accum=3'], 'divisible'),
    (['--seq_len=31'], 'even'),
    (['--eval_attn=full'], '--eval_only'),
    (['--dataset=text', '--vocab_size=258'], '--data_path'),
    (['--seq_len=32', '--max_seq_len=16'], 'shorter'),
    (['--max_steps=0'], '--max_steps must be >= 1'),
    (['--lr=0'], '--lr > 0'),
    (['--optimizer=sgd'], "invalid choice: 'sgd'"),
    (['--shared_qk=False'], 'shared_qk=False is valid only'),     # the model's own check
    (['--d_model=30', '--n_heads=4'], 'divisible by n_heads'),
    (['--dataset=text', '--vocab_size=258', '--data_path=/nonexistent/input.txt'], 'not found'),
    (['--resume'], 'no checkpoint'),
    (['--eval_only'], 'no checkpoint'),
])
def test_bad_inputs_give_clear_errors(tmp_path, capsys, flags, message):
    argv = TINY + [f'--out_dir={tmp_path}', f'--data_dir={tmp_path}'] + flags
    assert message in errors(argv, capsys)


# ----------------------------------------------------------------------------- training

def test_resume_is_exact(tmp_path, capsys):
    """N steps in one go == k steps, then --resume to N: the same losses and the same weights.
    Dropout and LSH draw from the RNG, so this checks that its state is saved and restored."""
    flags = ['--dropout=0.1', '--lr_schedule=rsqrt', '--reversible=True']
    run(tmp_path, *flags, '--max_steps=6', out='whole')
    run(tmp_path, *flags, '--max_steps=3', out='split')
    run(tmp_path, *flags, '--max_steps=6', '--resume', out='split')
    whole, split = read_log(tmp_path / 'whole' / 'log.jsonl'), read_log(tmp_path / 'split' / 'log.jsonl')
    losses = lambda log, kind: [(r['step'], r['loss']) for r in log if r['kind'] == kind]
    assert [s for s, _ in losses(whole, 'train')] == list(range(1, 7))
    assert losses(whole, 'train') == losses(split, 'train')
    assert losses(whole, 'eval') == [r for r in losses(split, 'eval') if r[0] != 3]   # + the eval at 3
    a = torch.load(tmp_path / 'whole' / 'ckpt.pt', weights_only=False)
    b = torch.load(tmp_path / 'split' / 'ckpt.pt', weights_only=False)
    assert a['step'] == b['step'] == 6 and a['data'] == b['data']
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert set(a) >= {'model', 'optimizer', 'scaler', 'step', 'rng', 'data', 'model_args', 'args', 'best_val'}
    assert os.path.exists(tmp_path / 'whole' / 'loss.png')
    assert not os.path.exists(tmp_path / 'whole' / 'ckpt.pt.tmp')
    best = torch.load(tmp_path / 'whole' / 'ckpt_best.pt', weights_only=False)   # an LM's too
    assert best['valid']['loss'] == min(loss for _, loss in losses(whole, 'eval'))
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith('final valid accuracy:')


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / 'ckpt.pt')
    train.save_checkpoint(path, {'step': 1})

    def crash(obj, f):   # dies half-way through writing the new checkpoint
        open(f, 'wb').write(b'half a checkpoint')
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(path, {'step': 2})
    assert torch.load(path, weights_only=False) == {'step': 1}


def test_average_checkpoints_is_the_exact_mean(tmp_path):
    """Two checkpoints average to (a + b) / 2, bit for bit, in any order; the rest of the dict
    and the integer tensors are the newest's (the higher step); another model is an error."""
    torch.manual_seed(0)
    make = lambda step: {'step': step, 'note': step, 'model': {
        'w': torch.randn(5, 3), 'b': torch.randn(3, dtype=torch.float64),
        'count': torch.tensor([step])}}
    a, b = make(100), make(200)
    for c in (a, b):
        train.save_checkpoint(str(tmp_path / f"{c['step']}.pt"), c)
    paths = [str(tmp_path / '200.pt'), str(tmp_path / '100.pt')]   # newest first: order is free
    avg = train.average_checkpoints(paths)
    for k in ('w', 'b'):
        assert torch.equal(avg['model'][k], (a['model'][k] + b['model'][k]) / 2)
        assert avg['model'][k].dtype == a['model'][k].dtype
    assert avg['model']['count'].tolist() == [200] and avg['note'] == 200
    assert avg['averaged_steps'] == [100, 200]
    train.save_checkpoint(str(tmp_path / 'other.pt'), {'step': 1, 'model': {'w': torch.zeros(2)}})
    with pytest.raises(ValueError, match="other parameters than"):
        train.average_checkpoints([paths[0], str(tmp_path / 'other.pt')])
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'checkpoint.py'),
                          str(tmp_path / 'avg.pt'), *paths], capture_output=True, text=True)
    assert out.returncode == 0 and 'steps [100, 200]' in out.stdout, out.stderr
    cli = torch.load(tmp_path / 'avg.pt', weights_only=False)
    assert all(torch.equal(cli['model'][k], avg['model'][k]) for k in avg['model'])


def test_resume_refuses_other_model_flags(tmp_path, capsys):
    run(tmp_path, '--max_steps=2')
    argv = TINY + [f'--out_dir={tmp_path / "out"}', '--max_steps=4', '--resume', '--n_hashes=4']
    assert "differ from the checkpoint's" in errors(argv, capsys)


def test_nan_loss_stops_with_step_and_checkpoint(tmp_path, monkeypatch):
    forward, calls = ReformerLM.forward, []

    def nan_at_step_5(self, idx, targets=None, padding_mask=None):
        logits, loss = forward(self, idx, targets, padding_mask)
        if torch.is_grad_enabled():   # training forwards only, one per step here
            calls.append(1)
            if len(calls) == 5:
                loss = loss * float('nan')
        return logits, loss

    monkeypatch.setattr(ReformerLM, 'forward', nan_at_step_5)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, '--max_steps=10')
    message = str(e.value.code)
    assert 'nan at step 5' in message and f"{tmp_path / 'out' / 'ckpt.pt'} (step 4)" in message
    assert torch.load(tmp_path / 'out' / 'ckpt.pt', weights_only=False)['step'] == 4


@pytest.mark.parametrize('flags', [
    ['--precision=bf16', '--grad_accum=2', '--lr_schedule=cosine'],
    ['--precision=fp16', '--optimizer=adafactor'],                          # LSH under fp16
    ['--precision=fp16', '--attn=full', '--shared_qk=False'],
    ['--ff_chunks=2', '--attn_pattern=local,lsh', '--pos_emb=absolute'],   # no logits with targets
    ['--attn=full', '--shared_qk=False', '--reversible=False', '--pos_emb=sinusoidal'],
    ['--attn=full_dot'], ['--attn_pattern=full_self,lsh'],   # the evaluation kinds train too
])
def test_variants_train(tmp_path, flags):
    m = run(tmp_path, '--max_steps=2', *flags)
    assert math.isfinite(m['loss']) and 0 <= m['accuracy'] <= 1


# ----------------------------------------------------------------------------- evaluation

def test_eval_only_with_other_attention(tmp_path, capsys):
    run(tmp_path, '--max_steps=2')
    capsys.readouterr()
    base = TINY + [f'--out_dir={tmp_path / "out"}', '--eval_only']
    lsh = train.main(base)
    assert train.main(base) == lsh   # a fixed seed: the same rotations every time
    full = train.main(base + ['--eval_attn=full'])
    lsh8 = train.main(base + ['--eval_n_hashes=8'])
    with pytest.raises(SystemExit, match='longer than the checkpoint'):
        train.main(base + ['--seq_len=64'])
    out = capsys.readouterr().out
    assert 'evaluated with full (n_hashes 2)' in out and 'evaluated with lsh (n_hashes 8)' in out
    records = read_log(tmp_path / 'out' / 'eval_only.jsonl')
    assert [(r['eval_attn'], r['eval_n_hashes']) for r in records] == [('lsh', 2), ('lsh', 2), ('full', 2), ('lsh', 8)]
    assert records[2]['accuracy'] == full['accuracy'] and records[3]['loss'] == lsh8['loss']
    assert all(r['targets'] == 8 * 15 for r in records)   # valid_size sequences x |w| = T/2 - 1


def test_text_bits_per_char_on_the_full_split(tmp_path, capsys):
    text = tmp_path / 'input.txt'
    text.write_bytes(bytes(range(32, 127)) * 40)   # 3,800 bytes: valid and test get 190 each
    flags = [f'--out_dir={tmp_path / "out"}', '--dataset=text', f'--data_path={text}',
             f'--data_dir={tmp_path / "data"}', '--device=cpu', '--seq_len=32', '--n_layers=1',
             '--d_model=16', '--n_heads=2', '--d_ff=32', '--bucket_size=4', '--batch_size=4',
             '--eval_iters=2', '--eval_interval=2']
    assert 'bpc' in train.main(flags + ['--max_steps=2'])
    for split in ('valid', 'test'):
        m = train.main(flags + ['--eval_only', f'--eval_split={split}'])
        assert math.isclose(m['bpc'], m['loss'] / math.log(2))
        assert f'on 189 {split} targets' in capsys.readouterr().out   # every byte but the first


# ----------------------------------------------------------------------------- torchrun

def torchrun(out, *flags):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(ROOT, 'train.py')] + TINY + [f'--out_dir={out}', '--grad_accum=2',
                                                     '--reversible=True', '--dropout=0.1', *flags]
    p = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_torchrun_two_ranks_end_identical(tmp_path):
    """Real 2-process DDP runs (gloo, CPU) with reversible layers, dropout and gradient accumulation:
    the ranks end with identical weights, and a resumed run matches an uninterrupted one."""
    out = torchrun(tmp_path / 'whole', '--max_steps=4')
    assert 'tokens per step: 128 = 4 sequences x 32 = 2 rank(s) x 2 grad-accumulation step(s) x 1 sequences' in out
    digest = re.search(r'parameters identical on all 2 ranks \(sha256 ([0-9a-f]+)\)', out)
    assert digest, out
    ckpt = torch.load(tmp_path / 'whole' / 'ckpt.pt', weights_only=False)
    model = ReformerLM(ModelConfig(**ckpt['model_args']))
    model.load_state_dict(ckpt['model'])
    assert train.params_fingerprint(model).startswith(digest.group(1))   # rank 0 saved those weights
    assert len(ckpt['rng']) == 2 and out.strip().splitlines()[-1].startswith('final valid accuracy')
    torchrun(tmp_path / 'split', '--max_steps=2')
    resumed = torchrun(tmp_path / 'split', '--max_steps=4', '--resume')
    assert digest.group(0) in resumed   # the same weights, bit for bit
    train_losses = lambda d: [r['loss'] for r in read_log(d / 'log.jsonl') if r['kind'] == 'train']
    assert train_losses(tmp_path / 'whole') == train_losses(tmp_path / 'split')


def test_offline_enwik8_is_a_message_not_a_traceback(tmp_path):
    """No network: the download fails (a proxy that refuses connections), train.py prints what to
    do by hand and exits non-zero, without a traceback. time.sleep is stubbed: no retry waits."""
    code = ("import sys, time; time.sleep = lambda s: None; sys.argv[0] = 'train.py'; "
            "import train; train.main(sys.argv[1:])")
    env = {k: v for k, v in os.environ.items() if k.lower() not in ('no_proxy', 'http_proxy')}
    proxy = 'http://127.0.0.1:9'   # the discard port: nothing listens, the connection is refused
    env.update(http_proxy=proxy, HTTP_PROXY=proxy, OMP_NUM_THREADS='1')
    p = subprocess.run([sys.executable, '-c', code, '--dataset=enwik8', f'--data_dir={tmp_path}',
                        '--device=cpu', f'--out_dir={tmp_path / "out"}'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and 'Traceback' not in p.stderr, p.stderr
    assert 'could not download' in p.stderr and 'place it by hand' in p.stderr, p.stderr


def test_dropout_knob_flags():
    args = flags.parse_args(['--dropout=0.1', '--relu_dropout=0.3'])
    config = flags.model_config(args)
    assert (config.attn_dropout, config.relu_dropout) == (None, 0.3)
    assert (config.rate('attn_dropout'), config.rate('relu_dropout')) == (0.1, 0.3)
    with pytest.raises(SystemExit):
        flags.parse_args(['--attn_dropout=1.5'])
