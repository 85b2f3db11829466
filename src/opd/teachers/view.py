"""A teacher that reads the student's completion after its own prompt, in its own tokens.

Two things a teacher may see differently from the student, each per row:
- **its own prompt** (teacher-only context): a row's `teacher_prompt` or `teacher_messages`
  (a reference answer, a document, a system prompt) replaces `prompt` / `messages` for the
  teacher; the student trains after its own prompt. With the student's tokenizer the completion
  keeps its ids and only moves to other columns, so every loss (sampled, top-k, full, JSD)
  works unchanged.
- **its own tokenizer**: the completion is decoded to text and encoded by the teacher's
  tokenizer (the prompt too, with the teacher's chat template for `messages` rows); the teacher
  scores its tokens and align.py carries the log-probs back to the student's tokens span by
  span. A student EOS (any special token ending the completion) is the teacher's EOS. Only the
  sampled-token loss is defined across vocabularies.

`TeacherView` wraps any teacher backend (in-process or served) that scores rows in its own
token ids, and is itself a teacher the router calls with each row's prompt.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import torch

from opd.data import Prompt, encode_row, left_pad, pack
from opd.errors import OpdError
from opd.teachers.align import align, char_ends, common_prefix, decode, spread
from opd.types import Rollouts

CONTEXT_FIELDS = ("teacher_prompt", "teacher_messages")


def teacher_row(row: dict) -> dict:
    """The row as the teacher reads it: its teacher_messages or teacher_prompt when it has one."""
    if "teacher_messages" in row:
        return {"messages": row["teacher_messages"]}
    if "teacher_prompt" in row:
        return {"prompt": row["teacher_prompt"]}
    return row


def has_context(prompts: list[Prompt]) -> bool:
    return any(f in p.row for p in prompts for f in CONTEXT_FIELDS)


class TeacherView:
    takes_prompts = True  # the router passes each row's Prompt

    def __init__(self, inner, name: str, student_tokenizer, tokenizer=None, context=None):
        """`tokenizer` None: the teacher shares the student's tokenizer (only its prompt may
        differ); `context`: the teacher's context length, when it has one."""
        self.inner, self.name = inner, name
        self.cross = tokenizer is not None
        self.student_tokenizer = student_tokenizer
        self.tokenizer = tokenizer or student_tokenizer
        self.context = context
        self.student_specials = set(student_tokenizer.all_special_ids)
        self.pad_id = next(
            (
                i
                for i in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)
                if i is not None
            ),
            0,
        )
        if self.cross and self.tokenizer.eos_token_id is None:
            raise OpdError(f"teacher [{name}]: its tokenizer has no EOS token to score the end")
        self._prompt_ids: dict[str, list[int]] = {}

    def prepare(self, prompts: list[Prompt], max_new_tokens: int) -> None:
        """Encode every prompt as the teacher reads it now, so a bad row stops the run before
        step 1 (naming file:line), and check that it leaves room for the completion."""
        for p in prompts:
            n = len(self.prompt_ids(p))
            if self.context and not self.cross and n + max_new_tokens > self.context:
                raise OpdError(
                    f"{p.where}: the teacher's prompt is {n} tokens; with "
                    f"sampling.max_new_tokens={max_new_tokens} it exceeds teacher "
                    f"[{self.name}]'s {self.context}-token context"
                )

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        ids = self._prompt_ids.get(prompt.where)
        if ids is None:
            if not self.cross and not any(f in prompt.row for f in CONTEXT_FIELDS):
                ids = prompt.ids
            else:
                ids = encode_row(teacher_row(prompt.row), self.tokenizer, prompt.where)
            self._prompt_ids[prompt.where] = ids
        return ids

    @property
    def model(self):
        """The in-process teacher's model (what memory.py counts), or a served one's name."""
        return getattr(self.inner, "model", None)

    # -- the Teacher protocol, with the rows' prompts ------------------------------------------

    def score_topk(self, rollouts: Rollouts, k: int, prompts_B: list[Prompt]):
        if self.cross:
            if k:
                raise OpdError(self.vocab_error("topk"))
            return self._score_cross(rollouts, prompts_B), None, None
        if not has_context(prompts_B):
            return _score(self.inner, rollouts, k)
        view, shift = self._moved(rollouts, prompts_B)
        lp, ids, lpk = _score(self.inner, view, k)
        P, B = rollouts.prompt_len, rollouts.num_rows
        cut = view.prompt_len
        lp_BT = torch.cat([lp.new_zeros(B, P), lp[:, cut:]], 1)
        if not k:
            return lp_BT, None, None
        K = ids.shape[-1]
        ids_BTK = torch.cat([ids.new_full((B, P, K), -1), ids[:, cut:]], 1)
        lpk_BTK = torch.cat([lpk.new_full((B, P, K), -torch.inf), lpk[:, cut:]], 1)
        return lp_BT, ids_BTK, lpk_BTK

    def score(self, rollouts: Rollouts, prompts_B: list[Prompt]) -> torch.Tensor:
        return self.score_topk(rollouts, 0, prompts_B)[0]

    def logits(self, rollouts: Rollouts, prompts_B: list[Prompt]):
        if self.cross:
            raise OpdError(self.vocab_error("full"))
        if not has_context(prompts_B):
            return self.inner.logits(rollouts)
        view, shift = self._moved(rollouts, prompts_B)
        fn, lp = self.inner.logits(view)
        lp_BT = torch.cat(
            [lp.new_zeros(rollouts.num_rows, rollouts.prompt_len), lp[:, view.prompt_len :]], 1
        )
        return (lambda rows_N, cols_N: fn(rows_N, cols_N + shift)), lp_BT

    def vocab_error(self, loss: str) -> str:
        return (
            f"objective.loss={loss!r} compares vocabularies, but teacher [{self.name}] has "
            "another tokenizer than the student's; use objective.loss=sampled"
        )

    def close(self) -> None:
        if hasattr(self.inner, "close"):
            self.inner.close()

    # -- the teacher's rows -------------------------------------------------------------------

    def _moved(self, rollouts: Rollouts, prompts_B: list[Prompt]) -> tuple[Rollouts, int]:
        """The batch with each row's teacher prompt in place of the student's; completions keep
        their ids and move by `shift` columns (the same for every row)."""
        P, device = rollouts.prompt_len, rollouts.tokens_BT.device
        prompt_BL, attn_BL = left_pad([self.prompt_ids(p) for p in prompts_B], self.pad_id, device)
        L = prompt_BL.shape[1]
        view = replace(
            rollouts,
            tokens_BT=torch.cat([prompt_BL, rollouts.tokens_BT[:, P:]], 1),
            attention_mask_BT=torch.cat([attn_BL, rollouts.attention_mask_BT[:, P:]], 1),
            completion_mask_BT=torch.cat(
                [
                    attn_BL.new_zeros(attn_BL.shape, dtype=torch.bool),
                    rollouts.completion_mask_BT[:, P:],
                ],
                1,
            ),
            sampler_lp_BT=torch.cat(
                [rollouts.sampler_lp_BT.new_zeros(attn_BL.shape), rollouts.sampler_lp_BT[:, P:]], 1
            ),
            prompt_len=L,
        )
        return view, L - P

    def _score_cross(self, rollouts: Rollouts, prompts_B: list[Prompt]) -> torch.Tensor:
        """(B, T) teacher log-probs on the student's tokens, spread over shared spans."""
        tokens, mask = rollouts.tokens_BT.cpu(), rollouts.completion_mask_BT.cpu()
        sampler_lp = rollouts.sampler_lp_BT.detach().float().cpu()
        plans, completions = [], []  # per row: (student columns, student spans, teacher spans)
        for b, prompt in enumerate(prompts_B):
            cols = mask[b].nonzero().flatten()
            ids = tokens[b, cols].tolist()
            ended = bool(ids) and ids[-1] in self.student_specials
            body = ids[:-1] if ended else ids
            text = decode(self.student_tokenizer, body)
            t_body = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            t_text = decode(self.tokenizer, t_body)
            s_ends = char_ends(self.student_tokenizer, body, text)
            t_ends = char_ends(self.tokenizer, t_body, t_text)
            s_span, t_span, n = align(s_ends, t_ends, len(text), common_prefix(text, t_text))
            if ended:  # the end is a span of its own: the student's stop token, the teacher's EOS
                s_span, t_span = s_span + [n], t_span + [n]
                t_body = t_body + [self.tokenizer.eos_token_id]
            length = len(self.prompt_ids(prompt)) + len(t_body)
            if self.context and length > self.context:
                raise OpdError(
                    f"{prompt.where}: the teacher's prompt and a completion in its tokens are "
                    f"{length} tokens, more than teacher [{self.name}]'s {self.context}-token "
                    "context; lower sampling.max_new_tokens"
                )
            plans.append((cols, s_span, t_span))
            completions.append(t_body)
        prompts = [self.prompt_ids(p) for p in prompts_B]
        tokens_BU, attn_BU, comp_BU, L = pack(prompts, completions, self.pad_id)
        view = Rollouts(
            tokens_BT=tokens_BU.to(rollouts.tokens_BT.device),
            attention_mask_BT=attn_BU.to(rollouts.tokens_BT.device),
            completion_mask_BT=comp_BU.to(rollouts.tokens_BT.device),
            prompt_len=L,
            sampler_lp_BT=torch.zeros(tokens_BU.shape, device=rollouts.tokens_BT.device),
            prompt_index_B=rollouts.prompt_index_B,
        )
        t_lp = _score(self.inner, view, 0)[0].float().cpu()
        out_BT = torch.zeros(tokens.shape)
        for b, (cols, s_span, t_span) in enumerate(plans):
            if len(cols):
                t_lp_D = t_lp[b, L : L + len(t_span)]
                out_BT[b, cols] = spread(sampler_lp[b, cols], t_lp_D, s_span, t_span)
        return out_BT.to(rollouts.tokens_BT.device)


def _score(teacher, rollouts: Rollouts, k: int):
    if k:
        return teacher.score_topk(rollouts, k)
    return teacher.score(rollouts), None, None


def notice(name: str, why: str) -> None:
    print(
        f"opd: teacher [{name}]: its tokenizer is not the student's ({why}); scoring across "
        "tokenizers: each completion is decoded to text, encoded by the teacher's tokenizer, "
        "and the KL is summed over the spans both tokenizations share (objective.loss=sampled)",
        file=sys.stderr,
    )
