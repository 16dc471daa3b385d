"""Suite-wide settings (one intra-op thread per test process) and shared fixtures (a module's dataset cache, an
interrupted, resumed run).

Every tensor in the suite is tiny, and two pytest workers on two cores with two threads each
oversubscribe the CPU (measured: one test went from 4 s to 70 s under load). Subprocesses that the
CLI tests start inherit OMP_NUM_THREADS. Results are identical with one or two threads.
"""

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    """Generated datasets go to a temporary cache, shared by the module's runs (subprocesses too): use it with
    ``pytestmark = pytest.mark.usefixtures("data_cache")``."""
    old = os.environ.get("ADVREG_CACHE")
    os.environ["ADVREG_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        del os.environ["ADVREG_CACHE"]
    else:
        os.environ["ADVREG_CACHE"] = old


@pytest.fixture
def interrupted_then_resumed(tmp_path, monkeypatch):
    """``run(config)``: train ``config`` into a folder, interrupted as epoch ``at`` begins, then resume it there;
    returns the resumed run's final metrics."""
    import advreg.train as training

    def run(config, at: int = 2):
        real_epoch = training.run_epoch

        def interrupted(state, epoch):
            if epoch == at:
                raise KeyboardInterrupt
            return real_epoch(state, epoch)

        monkeypatch.setattr(training, "run_epoch", interrupted)
        with pytest.raises(KeyboardInterrupt):
            training.train(config, tmp_path / "cut", progress=False)
        monkeypatch.setattr(training, "run_epoch", real_epoch)
        return training.train(config, tmp_path / "cut", resume=True, progress=False)

    return run
