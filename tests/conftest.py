"""Suite-wide settings: one intra-op thread per test process.

Every tensor in the suite is tiny, and two pytest workers on two cores with two threads each
oversubscribe the CPU (measured: one test went from 4 s to 70 s under load). Subprocesses that the
CLI tests start inherit OMP_NUM_THREADS. Results are identical with one or two threads.
"""
import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
