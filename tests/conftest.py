import os

import pytest
import torch

# Tests never reach the network: every model is built from config or read from tmp_path.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests (`pytestmark = pytest.mark.usefixtures(
    "one_thread")`): tiny models gain nothing from intra-op threads, and on a busy 2-core machine
    threads contending with another process made them several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
