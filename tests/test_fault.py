"""Fault tests for train.py's checkpoints: a run killed again and again (SIGKILL at random moments,
SIGKILL inside save_checkpoint, SIGTERM once), resumed each time with --resume=auto, ends with
the parameters, the training losses, the best, the kept and the averaged checkpoints of an
uninterrupted run, bit for bit. And a corrupted or truncated ckpt.pt gives a clear error naming
the file, and is left as it was.

    python -m pytest tests/test_fault.py        # about a minute on 2 CPU cores (7 processes)

The kills inside save_checkpoint are deterministic: REFORMER_TEST_SLOW_SAVE (tests only) makes
save_checkpoint print a line and sleep between writing ckpt.pt.tmp and renaming it, and the test
kills the process when it reads that line.
"""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from checkpoint import TEST_SLOW_SAVE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny LSH Reformer with dropout (so the RNG state matters): 60 steps, a checkpoint every 4.
FLAGS = ['--device=cpu', '--seq_len=32', '--vocab_size=8', '--n_layers=2', '--d_model=16',
         '--n_heads=2', '--d_ff=32', '--bucket_size=4', '--n_hashes=2', '--batch_size=4',
         '--valid_size=8', '--warmup=2', '--lr=3e-3', '--log_interval=1', '--eval_interval=4',
         '--dropout=0.1', '--average_last=3', '--max_steps=60']


STARTED = []   # every process a test starts; the fixture below kills any left when a test fails


@pytest.fixture(autouse=True)
def kill_leftovers():
    yield
    while STARTED:
        p = STARTED.pop()
        if p.poll() is None:
            p.kill()
            p.wait()


def start(out, **env):
    cmd = [sys.executable, os.path.join(ROOT, 'train.py'), *FLAGS, f'--out_dir={out}',
           '--resume=auto']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', **env)
    STARTED.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True))
    return STARTED[-1]


def read_until(p, text):
    """The lines p prints up to and including the first that contains text."""
    lines = []
    for line in p.stdout:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"process ended ({p.wait()}) before printing {text!r}: {''.join(lines)}")


def ckpt_step(out):
    path = out / 'ckpt.pt'
    return torch.load(path, weights_only=False)['step'] if path.exists() else 0


def train_losses(out):
    return [(r['step'], r['loss']) for r in map(json.loads, open(out / 'log.jsonl'))
            if r['kind'] == 'train']


def test_kills_and_resumes_end_bit_identical(tmp_path):
    t0 = time.time()
    whole, cut = tmp_path / 'whole', tmp_path / 'cut'
    p = start(whole)
    assert p.wait(timeout=120) == 0
    rng, kills = random.Random(0), 0
    for _ in range(3):   # SIGKILL at random moments: a random time after a random eval
        p = start(cut)
        read_until(p, f'step {ckpt_step(cut) + 4 * rng.randint(1, 2)}: valid')
        time.sleep(rng.uniform(0, 0.15))
        p.kill()
        kills += p.wait() == -signal.SIGKILL
        p.stdout.close()
    before = ckpt_step(cut)   # SIGKILL inside save_checkpoint: the previous checkpoint survives
    p = start(cut, **{TEST_SLOW_SAVE: '60'})
    path = read_until(p, f'{TEST_SLOW_SAVE}: in save_checkpoint')[-1].split()[-1]
    p.kill()
    p.wait()
    p.stdout.close()
    kills += 1
    # the first write of the next eval: ckpt_best.pt, ckpt_eval_STEP.pt or ckpt.pt, half written
    assert os.path.exists(path + '.tmp') and ckpt_step(cut) == before
    p = start(cut)   # SIGTERM: the step in flight finishes, a checkpoint, a message, exit 143
    eval_step = ckpt_step(cut) + 4
    read_until(p, f'step {eval_step}: valid')
    # Signal once the step after that eval is in log.jsonl: the stop then falls on step
    # eval_step + 1 or + 2, never on an eval step (whose own checkpoint would hide a missing one).
    # A fixed sleep after the eval line raced with the eval's own checkpoint under load.
    deadline = time.time() + 60
    logged = re.compile(rf'"step": {eval_step + 1}[,}}]')   # text: a last line may be half written
    while not logged.search((cut / 'log.jsonl').read_text()) and time.time() < deadline:
        time.sleep(0.005)
    p.send_signal(signal.SIGTERM)
    out = p.stdout.read()
    assert p.wait(timeout=60) == 128 + signal.SIGTERM, out
    kills += 1
    step = int(out.split('stopped by SIGTERM after step ')[1].split()[0])
    assert '--resume' in out and ckpt_step(cut) == step and step % 4, out   # not an eval step
    p.stdout.close()
    p = start(cut)
    assert p.wait(timeout=120) == 0 and ckpt_step(cut) == 60
    p.stdout.close()
    a = torch.load(whole / 'ckpt.pt', weights_only=False)
    b = torch.load(cut / 'ckpt.pt', weights_only=False)
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert a['data'] == b['data'] and train_losses(whole) == train_losses(cut)
    kept = sorted(p.name for p in whole.glob('ckpt_*.pt'))
    assert kept == ['ckpt_avg.pt', 'ckpt_best.pt', 'ckpt_eval_52.pt', 'ckpt_eval_56.pt',
                    'ckpt_eval_60.pt'] and sorted(p.name for p in cut.glob('ckpt_*.pt')) == kept
    for name in kept:   # the best by validation loss, the last 3 evals and their mean
        a = torch.load(whole / name, weights_only=False)
        b = torch.load(cut / name, weights_only=False)
        assert a['step'] == b['step'] and all(torch.equal(a['model'][k], b['model'][k])
                                              for k in a['model']), name
    assert kills == 5
    print(f"survived {kills} kills in {time.time() - t0:.0f} s")


@pytest.mark.parametrize('damage', ['garbage', 'truncated', 'empty'])
def test_damaged_checkpoint_is_a_clear_error_and_is_kept(tmp_path, capsys, damage):
    out = tmp_path / 'out'
    argv = FLAGS[:-1] + ['--max_steps=2', '--eval_interval=2', f'--out_dir={out}']
    train.main(argv)
    path = out / 'ckpt.pt'
    good = path.read_bytes()
    path.write_bytes({'garbage': b'not a checkpoint' * 100, 'truncated': good[:len(good) // 2],
                      'empty': b''}[damage])
    damaged = path.read_bytes()
    for flag in ('--resume', '--resume=auto', '--eval_only'):
        with pytest.raises(SystemExit) as e:
            train.main(argv[:-1] + ['--max_steps=4', flag, f'--out_dir={out}'])
        message = str(e.value.code)
        assert f'{path} is not a readable checkpoint' in message and 'Traceback' not in message
        assert path.read_bytes() == damaged   # left as it was, for the user to decide


def test_torchrun_sigterm_to_one_rank_stops_both_at_one_step(tmp_path):
    """SIGTERM to one of two torchrun workers: the all-reduced stop flag makes both stop after the
    same step (otherwise the other would wait in the next all-reduce until the timeout below), rank
    0 saves both ranks' RNG states, and --resume=auto finishes the run from there."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(ROOT, 'train.py'), *FLAGS[:-1], '--max_steps=400', f'--out_dir={tmp_path}',
           '--resume=auto']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True)
    STARTED.append(p)
    read_until(p, 'step 8: valid')
    with open(f'/proc/{p.pid}/task/{p.pid}/children') as f:
        workers = [int(pid) for pid in f.read().split()]
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGTERM)
    try:
        out = p.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:   # a rank kept training: the other waits in a collective
        for pid in [*workers, p.pid]:
            os.kill(pid, signal.SIGKILL)
        raise AssertionError('the ranks did not stop together')
    step = int(out.split('stopped by SIGTERM after step ')[1].split()[0])
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=False)
    assert ckpt['step'] == step < 400 and len(ckpt['rng']) == 2
    cmd[cmd.index('--max_steps=400')] = f'--max_steps={step + 2}'
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert 'parameters identical on all 2 ranks' in done.stdout


def test_a_second_ctrl_c_exits_at_once(tmp_path):
    """Ctrl-C (SIGINT) during a checkpoint write that takes a minute (the test hook), then Ctrl-C
    again: the process exits at once (130 = 128 + SIGINT), and ckpt.pt is never half written."""
    p = start(tmp_path, **{TEST_SLOW_SAVE: '60'})
    read_until(p, f'{TEST_SLOW_SAVE}: in save_checkpoint')
    p.send_signal(signal.SIGINT)
    time.sleep(1.5)   # a second signal within 1 s counts as the first (torchrun forwards Ctrl-C)
    t0 = time.time()
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=30) == 128 + signal.SIGINT and time.time() - t0 < 10
    p.stdout.close()
    # the first save of the first eval (ckpt_best.pt) stopped half-way: no checkpoint at all
    assert not list(tmp_path.glob('*.pt')) and list(tmp_path.glob('*.pt.tmp'))
