"""Shared test settings: float64 where identities are checked, fixed seeds, small hypothesis budgets."""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "lambdaskip", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile("lambdaskip")
os.environ.setdefault("LAMBDASKIP_PROFILE", "ci")
# Without a GPU the Triton kernels can only run interpreted. Triton reads TRITON_INTERPRET when its own
# @jit helpers are decorated, i.e. at its first import — which another test (transformers, torch
# internals) may trigger before tests/test_scan_triton.py runs. So switch the interpreter on for the
# whole session, before anything imports Triton. "auto" still picks the chunked backend on CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
