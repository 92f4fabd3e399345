import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

# Tiny models spend their time in thread hand-offs, not arithmetic: one thread is several times
# faster on a small shared CPU and keeps timings steady.
torch.set_num_threads(1)
