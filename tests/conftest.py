"""Shared test settings."""
import torch

# The test models are tiny: one thread is fastest, and far faster than two when the machine is busy.
torch.set_num_threads(1)
