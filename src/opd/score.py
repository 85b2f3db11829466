"""The score arrow of the step: what the objective needs from the teacher(s), and the task
rewards, added to the batch as typed fields (a new Rollouts; the sampled batch is not changed).

The objective (losses.py) says what the teacher gives: the sampled tokens' log-probs, also
their top-k, or the logits; each row goes to the teacher its prompt names (`TeacherRouter`).
Rewards come when the objective uses them (objective.kind=rl, or objective.reward_coef > 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from opd.data import Prompt
from opd.teachers import DEFAULT, TeacherRouter
from opd.types import Rollouts

# (batch, the step's prompts) -> (B,) reward of each row
Reward = Callable[[Rollouts, list[Prompt]], torch.Tensor]


@dataclass
class Scorer:
    teacher: TeacherRouter | None  # None: nothing is asked of a teacher (sft, rl)
    output: str  # what the teacher gives: "sampled", "topk", "logits"
    topk: int
    reward: Reward | None  # None: no rewards

    def __call__(self, batch: Rollouts, prompts: list[Prompt]) -> Rollouts:
        fields = {}
        if self.teacher is not None:
            names_B = self.teacher.names(batch, [p.row.get("teacher", DEFAULT) for p in prompts])
            prompts_B = [prompts[i] for i in batch.prompt_index_B.tolist()]
            fields |= self.teacher.fields(batch, names_B, self.output, self.topk, prompts_B)
        if self.reward is not None:
            fields["rewards_B"] = self.reward(batch, prompts)
        return replace(batch, **fields)

    def close(self) -> None:
        if self.teacher is not None:
            self.teacher.close()
