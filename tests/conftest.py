import os

import pytest
import torch
from hypothesis import settings

import glofnd
from glofnd import _ops

# CI replays the same examples on every run (reproducible failures); local runs keep exploring.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

BACKENDS = ["c", "reference"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs the test body once per implementation of the CPU path; yields the backend's name."""
    if request.param == "c" and _ops._C is None:
        if os.environ.get("GLOFND_REQUIRE_C"):
            pytest.fail("GLOFND_REQUIRE_C is set but the C extension glofnd._C is not built")
        pytest.skip("C extension not built")
    with glofnd.use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
