"""Shared test set-up. Run the whole suite with `python -m pytest` from the repository root.

The repository is flat (no package), so the root goes on sys.path here. Hypothesis has two
profiles: `dev` (random examples, the default) and `ci` (derandomised, fixed examples, chosen by
`HYPOTHESIS_PROFILE=ci`, which .ci/run sets) so CI is reproducible.
"""
import contextlib
import functools
import os
import sys

import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

settings.register_profile("dev", deadline=None, max_examples=20,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", deadline=None, max_examples=20, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# Tiny tensors: one thread is faster than two, and immune to other processes on the cores.
torch.set_num_threads(1)


def plain_forward(stack, x1, x2, **kwargs):
    """A reversible.ReversibleSequence's blocks as a plain loop: ordinary autograd saves every
    activation. The reference of each test of the reversible backward."""
    for block in stack.blocks:
        x1, x2 = block(x1, x2, **kwargs)
    return x1, x2


@contextlib.contextmanager
def ordinary_autograd(*stacks):
    """Run the stacks through plain_forward while inside."""
    for stack in stacks:
        stack.forward = functools.partial(plain_forward, stack)   # nn.Module.__call__ finds it
    try:
        yield
    finally:
        for stack in stacks:
            del stack.forward


def maybe_ordinary(reversible, *stacks):
    """ordinary_autograd(*stacks) when reversible is False, else nothing."""
    return contextlib.nullcontext() if reversible else ordinary_autograd(*stacks)
