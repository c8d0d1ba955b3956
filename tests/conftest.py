"""Shared test settings."""
import os
import tempfile

import torch

# SVDiff's SVD cache goes to a throwaway folder, not the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="nanocustom-test-cache-")
# The test models are tiny: one thread is fastest, and far faster than two when the machine is busy.
torch.set_num_threads(1)
