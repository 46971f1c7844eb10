"""Hypothesis profiles for the whole test suite.

* "ci" (selected when the CI environment variable is set): derandomized, a bounded number of
  examples, no deadline (a 2-core runner is slow and noisy), no example database.
* "dev" (the default): random, fewer examples, no deadline.

HYPOTHESIS_PROFILE=<name> overrides the choice (e.g. a long "thorough" run locally).
"""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

# the tests use tiny tensors: one thread avoids oversubscribing small CI machines
torch.set_num_threads(1)

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=40, deadline=None)
settings.register_profile("thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))
