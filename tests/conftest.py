"""Tests use tiny networks, for which one intra-op thread is faster than two and keeps runs repeatable."""

import torch

torch.set_num_threads(1)
