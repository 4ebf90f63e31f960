import os
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# subprocesses (the CLI, fresh interpreters) import this checkout's cpdfx, as the test process does,
# whatever was installed last; test_readme checks the installed package without it
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                          os.environ.get("PYTHONPATH")]))
os.environ["CPDFX_CACHE"] = tempfile.mkdtemp(prefix="cpdfx-test-cache-")  # no test reads or fills the user's cache
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train ~10x faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    from cpdfx import data
    return data.digits("train"), data.digits("test")


@pytest.fixture(scope="module")
def teacher(digits, one_thread):
    """A small ResNet at ~95% on digits, trained on the labels alone: the
    teacher of test_compress and test_learned (a module may define its own)."""
    from cpdfx.distill import distill
    from cpdfx.models import ResNetTiny
    torch.manual_seed(0)
    model = ResNetTiny(in_channels=1, widths=(8, 16, 32), blocks=(1, 1, 1))
    distill(model, None, digits[0], epochs=2, batch_size=32, lr=3e-3, progress=False)
    return model.eval()
