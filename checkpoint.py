"""
Checkpoints that survive preemption, for train.py: written atomically, read with a clear error,
with every RNG state that decides the next step, and a stop on SIGTERM / Ctrl-C that lets the
current optimizer step finish first. What train.py puts in a checkpoint, and how it resumes, is
in train.py (save_training_state, resume_from, restore); tests/test_fault.py kills it to prove it.

    save_checkpoint('out/ckpt.pt', {'model': model.state_dict(), 'rng': rng_state('cpu'), ...})
    ckpt = load_checkpoint('out/ckpt.pt', '--resume')    # SystemExit naming the file if unreadable
    with StopSignal() as stop:
        while training:
            ...one optimizer step...
            if stop.requested: save, then exit
    save_checkpoint('out/ckpt_avg.pt', average_checkpoints(['out/ckpt_eval_900.pt', ...]))
    python checkpoint.py out/ckpt_avg.pt out/ckpt_eval_*.pt   # the same, from the shell

Why each piece:
  - atomic write: torch.save goes to ckpt.pt.tmp, fsync'ed, then os.replace renames it over
    ckpt.pt. A rename is atomic on POSIX, so a kill at any moment leaves either the old or the new
    checkpoint whole, never half of one; a stale .tmp is simply overwritten by the next save.
  - RNG states: dropout and the LSH rotations draw from torch's RNG, so without its state a resumed
    run would draw other masks and rotations than an uninterrupted one.
  - the signal handler only sets a flag: the step in flight finishes (a half-done optimizer step
    cannot be saved), and under torchrun train.py all-reduces the flag so all ranks stop together.
"""
import hashlib
import os
import random
import signal
import threading
import time

import numpy as np
import torch

TEST_SLOW_SAVE = 'REFORMER_TEST_SLOW_SAVE'   # tests only: seconds to sleep inside save_checkpoint


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
    with open(path + '.tmp', 'rb') as f:
        os.fsync(f.fileno())   # on disk before the rename, so a power cut cannot leave a hole
    if os.environ.get(TEST_SLOW_SAVE):   # tests/test_fault.py kills the process in this window
        print(f"{TEST_SLOW_SAVE}: in save_checkpoint {path}", flush=True)
        time.sleep(float(os.environ[TEST_SLOW_SAVE]))
    os.replace(path + '.tmp', path)   # atomic


def load_checkpoint(path, flag):
    """The checkpoint at path, or SystemExit naming the file and the flag that wanted it."""
    if not os.path.exists(path):
        raise SystemExit(f"error: {flag}: no checkpoint at {path}; train first, or point "
                         f"--out_dir at one")
    try:   # weights_only=False: our own file, with NumPy and Python RNG states beside the tensors
        return torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:   # truncated or overwritten: zip, pickle or EOF errors, whichever
        why = (str(e).strip().splitlines() or ['-'])[0][:100]
        raise SystemExit(f"error: {flag}: {path} is not a readable checkpoint (truncated or "
                         f"corrupted: {type(e).__name__}: {why}). It is left as it is; move it "
                         f"away to start afresh.")


def average_checkpoints(paths):
    """The parameter mean of checkpoints of one model (as fairseq's average_checkpoints.py and
    Vaswani et al. Section 6.1, who average the last 5 or 20): the newest checkpoint's dict (the
    highest 'step'; in a tie the later path) with every floating-point tensor of 'model'
    replaced by its mean over the paths, summed in float64 and rounded once to its dtype, and
    'averaged_steps' added. Other tensors (integer buffers) are the newest's. ValueError if the
    models differ in names or shapes.

        save_checkpoint('out/ckpt_avg.pt', average_checkpoints(glob.glob('out/ckpt_eval_*.pt')))
    """
    if not paths:
        raise ValueError("average_checkpoints needs at least one checkpoint, got none")
    loaded = [(p, load_checkpoint(p, 'average_checkpoints')) for p in paths]
    loaded.sort(key=lambda pc: pc[1].get('step') or 0)   # stable: ties keep the given order
    ckpts = [c for _, c in loaded]
    newest = ckpts[-1]['model']
    for path, c in loaded:
        shapes = {k: tuple(v.shape) for k, v in c['model'].items()}
        if shapes != {k: tuple(v.shape) for k, v in newest.items()}:
            raise ValueError(f"average_checkpoints: {path} holds other parameters than "
                             f"{loaded[-1][0]} (names or shapes differ): not the same model")
    mean = {}
    for k, v in newest.items():
        if not v.is_floating_point():
            mean[k] = v
            continue
        total = sum(c['model'][k].double() for c in ckpts)
        mean[k] = (total / len(ckpts)).to(v.dtype)
    return {**ckpts[-1], 'model': mean, 'averaged_steps': [c.get('step') for c in ckpts]}


def params_fingerprint(model):
    """SHA-256 of every parameter and buffer, bit for bit: equal on all ranks iff in sync."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class StopSignal:
    """SIGTERM (a cluster preempting the job) or SIGINT (Ctrl-C) sets `requested`; the training
    loop then finishes its step, saves and exits. A second signal exits at once, unless it comes
    within a second of the first: torchrun passes a terminal's Ctrl-C on to its workers, which
    then see it twice. Outside the `with` block the previous handlers are back."""

    def __enter__(self):
        self.signum, self.first, self.old = None, 0.0, {}
        if threading.current_thread() is threading.main_thread():   # Python's rule for handlers
            self.old = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    @property
    def requested(self):
        return self.signum is not None

    def handle(self, signum, frame):
        name = signal.Signals(signum).name   # os.write: print is not safe inside a signal handler
        if self.signum is None:
            self.signum, self.first = signum, time.monotonic()
            os.write(2, f"\n{name}: stopping after this step (again to stop at once)\n".encode())
        elif time.monotonic() - self.first > 1.0:
            os.write(2, f"\n{name} again: exiting now, without saving this step\n".encode())
            os._exit(128 + signum)

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)


if __name__ == '__main__':
    import argparse
    p = argparse.ArgumentParser(description="Average checkpoints' parameters (average_checkpoints)")
    p.add_argument('output', help='the averaged checkpoint to write, e.g. out/ckpt_avg.pt')
    p.add_argument('inputs', nargs='+', help='checkpoints of one model, in any order')
    a = p.parse_args()
    try:
        avg = average_checkpoints(a.inputs)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    save_checkpoint(a.output, avg)
    print(f"{a.output}: the mean of {len(a.inputs)} checkpoints, steps {avg['averaged_steps']}")
