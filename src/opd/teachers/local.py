"""In-process teacher: a Hugging Face model on the same machine, scored under inference_mode.

With `fast` (run.fast_paths) the sampled tokens' log-probs come from `fast/`: each distinct
prompt once with packed linears, or the backbone then the LM head chunk by chunk; without it
(or where a fast path does not apply) from the plain forward, `logprobs.completion_logprobs`.
"""

from __future__ import annotations

import torch

from opd.fast.heads import logprobs_at, plain_head, score_completions
from opd.fast.packed import PackedLinears, call_module
from opd.fast.shared_prompt import score_shared_prompts, shared_prompt_supported
from opd.logprobs import completion_hidden, completion_logprobs, completion_topk, token_logprobs
from opd.models import check_plain_head, inner_model, post_head
from opd.types import Rollouts, TeacherLogits, autocast_context

# A teacher whose linear weights fit in this many bytes keeps a packed copy of them for the
# shared-prompt pass (packed.py): faster multiplies on a CPU for twice the memory.
PACK_TEACHER_MAX_BYTES = 1 << 30


class LocalTeacher:
    def __init__(
        self,
        model,
        vocab_size: int,
        micro_batch_size: int = 0,
        chunk: int = 512,
        autocast: str = "none",
        fast: bool = True,
    ):
        self.model = model.eval()
        self.chunk = chunk
        self.autocast = autocast
        self.vocab_size = vocab_size
        self.micro_batch_size = micro_batch_size
        self.fast = fast
        linear_bytes = sum(
            m.weight.numel() * 4  # the packed copy is float32 (packed.py)
            for m in model.modules()
            if type(m) is torch.nn.Linear
        )
        self.linear = PackedLinears() if linear_bytes <= PACK_TEACHER_MAX_BYTES else call_module

    @property
    def shared_prompts(self) -> bool:
        """Checked at each call, like plain_head: a hook added later changes the answer."""
        return self.fast and shared_prompt_supported(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        return self.score_topk(rollouts, 0)[0]

    def score_topk(self, rollouts: Rollouts, k: int):
        """Sampled-token log-probs (B, T), and for k > 0 the top-k (+ the sampled token when
        outside them) as (B, T, k + 1) ids and log-probs, padded with -1 / -inf."""
        device = self.device
        step = self.micro_batch_size or rollouts.num_rows
        lps, ids, lpks = [], [], []
        with torch.inference_mode(), autocast_context(device, self.autocast):
            for start in range(0, rollouts.num_rows, step):
                mb = rollouts.slice(start, start + step).to(device)
                args = (self.model, mb.tokens_BT, mb.attention_mask_BT, mb.prompt_len)
                if k:
                    lp_BT, ids_BTK, lp_BTK = completion_topk(*args, self.vocab_size, k)
                    ids.append(ids_BTK)
                    lpks.append(lp_BTK)
                else:
                    lp_BT = self._sampled(mb)
                lps.append(lp_BT.float())
        mask_BT = rollouts.completion_mask_BT.to(device)
        lp_BT = torch.where(mask_BT, torch.cat(lps), 0.0).clone()  # a plain tensor: a constant
        if not k:
            return lp_BT, None, None
        return lp_BT, torch.cat(ids).clone(), torch.cat(lpks).clone()

    def _sampled(self, mb: Rollouts) -> torch.Tensor:
        """(B, T) log-probs of the sampled tokens, by the fastest path that applies."""
        args = (self.model, mb.tokens_BT, mb.attention_mask_BT, mb.completion_mask_BT)
        if self.fast:  # each distinct prompt once, or no (B, T, V) logits
            shared = score_shared_prompts(
                *args, mb.prompt_len, self.vocab_size, self.chunk, self.linear
            )
            if shared is not None:
                return shared
            if plain_head(self.model) is not None:
                return score_completions(*args, self.vocab_size, self.chunk)
        return completion_logprobs(*args[:3], mb.prompt_len, self.vocab_size)

    def logits(self, rollouts: Rollouts) -> tuple[TeacherLogits, torch.Tensor]:
        """For the full-vocabulary losses: the teacher's logits at any completion position, and
        its (B, T) log-probs of the sampled tokens (the KL metric), from one backbone pass.

        The backbone runs micro_batch_size rows at a time (0: all) under inference_mode; the N
        hidden states that predict completion tokens are kept, and the LM head runs when the
        loss asks for a chunk of positions, so no (B, T, V) teacher tensor exists. The head's
        output goes through the model's `models.post_head` (soft-cap, logit scale) as in its
        forward.
        """
        model = inner_model(self.model)
        check_plain_head(model)
        head, post = model.get_output_embeddings(), post_head(model.config)
        V = self.vocab_size
        device = self.device
        batch = rollouts.to(device)
        step = self.micro_batch_size or rollouts.num_rows
        parts = []
        with torch.inference_mode(), autocast_context(device, self.autocast):
            for start in range(0, rollouts.num_rows, step):
                mb = batch.slice(start, start + step)
                parts.append(
                    completion_hidden(
                        model, mb.tokens_BT, mb.attention_mask_BT, mb.completion_mask_BT
                    )[0]
                )
            h_NH = torch.cat(parts)
            rows_N, cols_N = batch.completion_mask_BT.nonzero(as_tuple=True)
            args = (h_NH, rows_N, cols_N, batch.tokens_BT, V, self.chunk, post)
            if self.fast and plain_head(model) is not None:  # reused buffers, in-place softmax
                lp_BT = logprobs_at(head, *args)
            else:
                lp_BT = plain_logprobs_at(head, *args)
        h_NH, lp_BT = h_NH.clone(), lp_BT.clone()  # plain tensors again
        # (row, col) -> which of the N kept hidden states predicts that token
        where_BT = torch.full(batch.tokens_BT.shape, -1, dtype=torch.long, device=device)
        where_BT[rows_N, cols_N] = torch.arange(rows_N.numel(), device=device)

        def logits(rows_N: torch.Tensor, cols_N: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                h_nH = h_NH[where_BT[rows_N.to(device), cols_N.to(device)]]
                return post(head(h_nH)[:, :V].float())

        return logits, lp_BT


def plain_logprobs_at(head, h_NH, rows_N, cols_N, tokens_BT, vocab_size, chunk, post):
    """`fast.heads.logprobs_at` with plain torch ops: the head's logits chunk by chunk."""
    lp_BT = torch.zeros(tokens_BT.shape, dtype=torch.float32, device=tokens_BT.device)
    for start in range(0, h_NH.shape[0], chunk):
        sl = slice(start, start + chunk)
        logits_nV = post(head(h_NH[sl])[:, :vocab_size].float())
        lp_BT[rows_N[sl], cols_N[sl]] = token_logprobs(
            logits_nV, tokens_BT[rows_N[sl], cols_N[sl]], vocab_size
        )
    return lp_BT
