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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
