"""Shared test set-up. Run the whole suite with `python -m pytest` from the repository root.

The repository is flat (no package), so the root goes on sys.path here. Hypothesis has two
profiles: `dev` (random examples, the default) and `ci` (derandomised, fixed examples, chosen by
`HYPOTHESIS_PROFILE=ci`, which .ci/run sets) so CI is reproducible.
"""
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
