"""NCCL send/recv between two processes (cuda:0 -> cuda:1) through PyTorch: the baseline the
cross-process GPU->GPU transfer of `mooncake bench transfer --protocol nvlink_intra` is
compared with (docs/gpu.md). Prints one JSON line: bytes per message and GB/s.

    python3 nccl_sendrecv.py [--size-mib 1024] [--iters 20]
"""

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank, args, port, q):
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            device_id=torch.device("cuda", rank))
    n = args.size_mib << 20
    buf = torch.empty(n, dtype=torch.uint8, device="cuda")
    if rank == 0:
        buf.copy_(torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda"))

    def step():
        if rank == 0:
            dist.send(buf, 1)
        else:
            dist.recv(buf, 0)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    dist.barrier()
    if rank == 1:
        q.put({"baseline": "nccl send/recv cuda:0 -> cuda:1 (2 processes)", "bytes": n,
               "iters": args.iters, "gb_per_s": n * args.iters / dt / 1e9})
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--port", type=int, default=29533)
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, args, args.port, q)) for r in range(2)]
    for pr in procs:
        pr.start()
    res = q.get(timeout=300)
    for pr in procs:
        pr.join()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
