"""Run by `mlx.launch -n 2 --backend ring` (see test_clip_distributed.py).

Each rank holds a different shard of the same gradient tree; every rank must
see the global norm of the concatenated shards (checked against NumPy over
the shards of all ranks, which every rank can rebuild from the seeds).
"""
import sys

import mlx.core as mx
import numpy as np

from gradwatch.clip import GlobalNorm, global_norm


def shard(rank: int) -> dict:
    rng = np.random.default_rng(1234 + rank)
    return {"w": rng.standard_normal((8 + rank, 5)).astype(np.float32),
            "b": [rng.standard_normal(3 + 2 * rank).astype(np.float32)]}


def main() -> int:
    group = mx.distributed.init(strict=True)
    rank, size = group.rank(), group.size()
    local = {"w": mx.array(shard(rank)["w"]), "b": [mx.array(shard(rank)["b"][0])]}
    everything = np.concatenate([np.concatenate([s["w"].ravel(), s["b"][0]])
                                 for s in map(shard, range(size))]).astype(np.float64)
    expected = float(np.linalg.norm(everything))
    expected_inf = float(np.abs(everything).max())
    local_only = float(np.linalg.norm(np.concatenate([shard(rank)["w"].ravel(), shard(rank)["b"][0]])))

    norm = global_norm(local, group=group).item()
    norm_inf = global_norm(local, ord=float("inf"), group=group).item()
    clipped, info = GlobalNorm(1.0, group=group)(local)
    mx.eval(clipped, info)
    ok = (abs(norm - expected) <= 1e-5 * expected and abs(norm_inf - expected_inf) <= 1e-6
          and abs(info.pre_norm.item() - expected) <= 1e-5 * expected
          and abs(info.post_norm.item() - 1.0) <= 1e-5 and abs(local_only - expected) > 1e-3)
    scale = 1.0 / (expected + 1e-6)
    ok = ok and np.allclose(np.array(clipped["w"]), shard(rank)["w"] * scale, rtol=1e-5)
    print(f"rank {rank}/{size}: norm={norm:.6f} expected={expected:.6f} inf={norm_inf:.6f} "
          f"local_only={local_only:.6f} {'OK' if ok else 'MISMATCH'}", flush=True)
    return 0 if ok and size == 2 else 1


if __name__ == "__main__":
    sys.exit(main())
