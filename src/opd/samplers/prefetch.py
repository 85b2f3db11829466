"""Sampling one step ahead, for an engine sampler (sampling.staleness, sampling.backend=vllm).

With staleness 1 (one-step-off), step k asks the engine for step k+1's rollouts before it
trains: the engine samples them from the weights it holds (step k's, synced after step k-1)
while the learner computes step k's update. Step k+1 then trains on rollouts one update old;
the importance ratio exp(lp_train - lp_sampler) already corrects for the policy that sampled
them, and objective.tis_cap can truncate it. With staleness 0 the request for step k+1 goes out
after step k's update has reached the engine: the synchronous run's rollouts, through the same
code path.

A sync waits for the request in flight (the engine never reloads weights mid-request); an
engine serving a fixed teacher (SFT) never reloads, and its request runs on into the next
step: rows sampled ahead from the teacher are the rows it would sample now (staleness 0). The
step after a checkpoint is never prefetched: a resumed run samples that step from the weights
it loads, so an uninterrupted run must too (resume stays exact).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from opd.data import Prompt
from opd.types import Rollouts


class Prefetch:
    def __init__(self, sampler):
        self.sampler = sampler
        # False for an engine serving a fixed teacher (SFT): it never reloads, so what it
        # samples ahead is what it would sample now, and a sync need not wait for it
        self.follows = getattr(sampler, "follow", True)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="opd-prefetch")
        self.pending: tuple[int, Future, int] | None = None  # (step, its rollouts, staleness)

    def take(self, step: int, prompts_P: list[Prompt], group_size: int, gen: torch.Generator):
        """(the step's rollouts, how many updates old the weights that sampled them are)."""
        pending, self.pending = self.pending, None
        if pending is not None and pending[0] == step:
            return pending[1].result(), pending[2]
        if pending is not None:  # asked for another step (never in a run): discard it
            pending[1].result()
        return self.sampler.sample(prompts_P, group_size, gen), 0

    def ahead(self, step: int, prompts_P, group_size: int, gen, staleness: int) -> None:
        """Ask now for `step`'s rollouts, to be taken by `take(step, ...)`."""
        future = self.pool.submit(self.sampler.sample, prompts_P, group_size, gen)
        self.pending = (step, future, staleness if self.follows else 0)

    def sync(self) -> dict:
        # the engine finishes what it samples before it reloads
        if self.pending is not None and self.follows:
            self.pending[1].result()
        return self.sampler.sync()

    def sample(self, prompts_P, group_size: int, gen) -> Rollouts:
        return self.sampler.sample(prompts_P, group_size, gen)

    def close(self) -> None:
        if self.pending is not None:
            self.pending[1].cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.sampler.close()
