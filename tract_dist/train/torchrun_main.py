"""Entry point for torchrun: ``python -m torch.distributed.run ... -m tract_dist.train.torchrun_main loop.json``."""

from __future__ import annotations

import json
import sys

from tract_dist.train.worker import train_worker

if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        train_worker(json.load(f))
