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
