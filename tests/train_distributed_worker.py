"""Worker of tests/test_train_distributed.py: one process of a ``torch.distributed.run`` CPU (gloo) training run.

    python -m torch.distributed.run --nproc_per_node 2 tests/train_distributed_worker.py SHARDS OUT BATCH OVERRIDES_JSON
Rank 0 writes OUT/result.json (per-step losses, final validation metrics, process count, distributed type).
"""
from __future__ import annotations

import json
import os
import sys


def main() -> None:
    from stalign.training.trainer import train_from_config

    shards, out, batch_size, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    result = train_from_config("configs/tiny_test.yaml", data=shards, output_dir=out, batch_size=batch_size,
                               **overrides)
    if int(os.environ.get("RANK", "0")) == 0:
        from accelerate import PartialState

        state = PartialState()
        with open(os.path.join(out, "result.json"), "w") as fh:
            json.dump({"losses": result.losses, "metrics": result.metrics, "num_processes": state.num_processes,
                       "distributed_type": str(state.distributed_type)}, fh)


if __name__ == "__main__":
    main()
