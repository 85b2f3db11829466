"""Data parallelism with torch.distributed, set up from torchrun's environment variables.

Every rank samples, scores and back-propagates its own shard of the step's prompts; gradients are
summed with one all-reduce per step (each rank's loss is already divided by the global token
count, so the sum is the exact batch mean). Rank 0 writes every file. One process without
torchrun is simply world size 1.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from opd.errors import OpdError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)  # nccl needs cuda tensors
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def max(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        if self.world_size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def check_in_sync(self, params: list[torch.nn.Parameter], step: int) -> None:
        """Fail loudly if the ranks' weights have drifted apart (a missed all-reduce)."""
        if self.world_size == 1:
            return
        total = sum(float(p.detach().double().sum()) for p in params)
        low, high = -self.max([-total])[0], self.max([total])[0]
        if low != high:
            raise RuntimeError(f"step {step}: ranks hold different weights ({low} != {high})")

    def clock(self) -> float:
        """perf_counter once this device's queued work is done (CUDA runs asynchronously, so a
        phase's time/* would otherwise count only the launching of its kernels)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str = "auto", threads: int = 0) -> DistContext:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if device == "cuda" and not torch.cuda.is_available():
        raise OpdError("run.device='cuda' but torch sees no CUDA device")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
        if threads > 0:
            torch.set_num_threads(threads)
        elif local_world > 1:  # share the cores instead of oversubscribing them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)
