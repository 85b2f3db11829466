"""Teachers score sampled tokens: log p_teacher(x_t | prompt, x_<t) for every completion token.

A backend is any object with a `score` method (and `score_topk` for the top-k loss; `logits`
for the full-vocabulary losses): the in-process `LocalTeacher`, the HTTP `ServedTeacher` (with
`served_vocab.ServedVocab` for `logits`), or a `view.TeacherView` around either, which reads
each row's own teacher prompt and its own tokenizer (the router passes it the rows' prompts). `TeacherRouter` holds one or more named teachers and sends each row to the
teacher its prompt names (the row's "teacher" field).
"""

from __future__ import annotations

from typing import Protocol

import torch

from opd.errors import OpdError
from opd.types import Rollouts

DEFAULT = "default"


class Teacher(Protocol):
    def score(self, rollouts: Rollouts) -> torch.Tensor:
        """(B, T) teacher log-probs aligned with rollouts.tokens_BT (0 outside completions)."""
        ...

    def score_topk(self, rollouts: Rollouts, k: int):
        """(lp_BT, ids_BTK, lp_BTK): sampled-token log-probs and the teacher's top-k."""
        ...


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def teacher_specs(teacher: str, teachers: str) -> dict[str, str]:
    """{name: folder or URL}: model.teacher as "default", plus model.teachers' name=spec pairs."""
    specs = {DEFAULT: teacher} if teacher else {}
    for item in filter(None, (x.strip() for x in teachers.split(","))):
        name, sep, spec = (s.strip() for s in item.partition("="))
        if not sep or not name or not spec:
            raise OpdError(f"model.teachers: {item!r} is not name=FOLDER_OR_URL")
        if name in specs:
            raise OpdError(f"model.teachers: teacher {name!r} is named twice")
        specs[name] = spec
    return specs


class TeacherRouter:
    """Named teachers; each row goes to the teacher of its prompt (default: "default")."""

    def __init__(self, teachers: dict[str, Teacher]):
        self.teachers = teachers

    def names(self, rollouts: Rollouts, prompt_names: list[str]) -> tuple[str, ...]:
        return tuple(prompt_names[i] for i in rollouts.prompt_index_B.tolist())

    def fields(self, rollouts: Rollouts, names_B, output: str, k: int = 0, prompts_B=None) -> dict:
        """The Rollouts fields this teacher output adds: 'sampled' (the sampled tokens'
        log-probs), 'topk' (and the top-k) or 'logits' (and the logits).
        prompts_B: each row's Prompt, for teachers that read their own prompt (view.py)."""
        out = {"teacher_B": tuple(names_B)}
        if output != "logits":
            lp_BT, ids_BTK, lp_BTK = self.score_topk(
                rollouts, names_B, k if output == "topk" else 0, prompts_B
            )
            out |= {"teacher_lp_BT": lp_BT}
            if output == "topk":
                out |= {"teacher_topk_ids_BTK": ids_BTK, "teacher_topk_lp_BTK": lp_BTK}
            return out
        B, device = rollouts.num_rows, rollouts.tokens_BT.device
        lp_BT = torch.zeros(rollouts.tokens_BT.shape, device=device)
        parts = []  # (rows of this teacher, its logits function over its own rows)
        for name, rows in self.groups(names_B).items():
            teacher = self.teachers[name]
            args = (rollouts.select(rows),)
            if getattr(teacher, "takes_prompts", False):
                args += ([prompts_B[i] for i in rows.tolist()],)
            fn, lp_rows_BT = teacher.logits(*args)
            lp_BT[rows.to(device)] = lp_rows_BT.to(device)
            parts.append((rows, fn))
        return out | {"teacher_lp_BT": lp_BT, "teacher_logits": routed_logits(parts, B)}

    def groups(self, names_B: list[str]) -> dict[str, torch.Tensor]:
        """{teacher name: row indices}, in a fixed order."""
        out: dict[str, list[int]] = {}
        for b, name in enumerate(names_B):
            out.setdefault(name, []).append(b)
        return {name: torch.tensor(rows) for name, rows in sorted(out.items())}

    def score(self, rollouts: Rollouts, names_B: list[str] | None = None, prompts_B=None):
        return self.score_topk(rollouts, names_B, 0, prompts_B)[0]

    def score_topk(self, rollouts: Rollouts, names_B: list[str] | None, k: int, prompts_B=None):
        """Each row scored by its teacher; names_B None sends every row to the default one."""
        groups = self.groups(names_B or [DEFAULT] * rollouts.num_rows)
        if len(groups) == 1:
            (name,) = groups
            return self._call(self.teachers[name], rollouts, k, prompts_B)
        B, T = rollouts.tokens_BT.shape
        device = rollouts.tokens_BT.device
        lp_BT = torch.zeros(B, T, device=device)
        ids_BTK = torch.full((B, T, k + 1), -1, dtype=torch.long, device=device) if k else None
        lpk_BTK = torch.full((B, T, k + 1), -torch.inf, device=device) if k else None
        for name, rows in groups.items():
            mine = [prompts_B[i] for i in rows.tolist()] if prompts_B is not None else None
            lp, ids, lpk = self._call(self.teachers[name], rollouts.select(rows), k, mine)
            rows = rows.to(device)
            lp_BT[rows] = lp.to(device)
            if k:
                ids_BTK[rows] = ids.to(device)
                lpk_BTK[rows] = lpk.to(device)
        return lp_BT, ids_BTK, lpk_BTK

    @staticmethod
    def _call(teacher, rollouts, k, prompts_B):
        if getattr(teacher, "takes_prompts", False):  # a TeacherView: its own prompt, tokens
            if prompts_B is None:
                raise OpdError("a teacher that reads its own prompt was called without prompts")
            return teacher.score_topk(rollouts, k, prompts_B)
        if k:
            return teacher.score_topk(rollouts, k)
        return teacher.score(rollouts), None, None

    def close(self) -> None:
        for t in self.teachers.values():
            if hasattr(t, "close"):
                t.close()


def routed_logits(parts, num_rows: int):
    """One TeacherLogits over the batch from each teacher's over its own rows: parts is
    [(rows_R: the batch rows a teacher scored, its TeacherLogits over rows 0..R-1)]."""
    routes = []  # (where_B: each batch row's index among the teacher's rows, -1 if not there)
    for rows_R, fn in parts:
        where_B = torch.full((num_rows,), -1, dtype=torch.long)
        where_B[rows_R.cpu()] = torch.arange(len(rows_R))
        routes.append((where_B, fn))

    def logits(rows_N: torch.Tensor, cols_N: torch.Tensor) -> torch.Tensor:
        out = None
        for where_B, fn in routes:
            mine_N = where_B[rows_N.cpu()]
            sel_N = mine_N >= 0
            if not sel_N.any():
                continue
            part = fn(mine_N[sel_N], cols_N[sel_N.to(cols_N.device)])
            if out is None:
                out = part.new_zeros(len(rows_N), part.shape[1])
            out[sel_N.to(part.device)] = part
        return out

    return logits
