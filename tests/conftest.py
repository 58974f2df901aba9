import os
import tempfile
from typing import NamedTuple

import pytest
import torch

# Tests never reach the network: every model is built from config or read from tmp_path.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The record index (datamodules/record_index.py) of every DataModule built by a test, its commands'
# subprocesses included, goes to a folder of this session's, never to the user's cache.
os.environ["MEDSD_CACHE_DIR"] = tempfile.mkdtemp(prefix="medsd-test-cache-")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests (`pytestmark = pytest.mark.usefixtures(
    "one_thread")`): tiny models gain nothing from intra-op threads, and on a busy 2-core machine
    threads contending with another process made them several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class RenderCall(NamedTuple):
    """One batch `medsd sample` rendered: the pipeline's sampler class, texts, steps and guidance."""

    sampler: str
    texts: list[str]
    steps: int
    guidance: float


@pytest.fixture
def render_calls(monkeypatch) -> list[RenderCall]:
    """`medsd sample`'s render calls in this test, each recorded and then made."""
    import experiments.sample as sample_module

    real = sample_module.render
    calls: list[RenderCall] = []

    def recording(pipe, prompts, seeds, steps, guidance, *size):
        calls.append(RenderCall(type(pipe.scheduler).__name__, list(prompts), steps, guidance))
        return real(pipe, prompts, seeds, steps, guidance, *size)

    monkeypatch.setattr(sample_module, "render", recording)
    return calls
