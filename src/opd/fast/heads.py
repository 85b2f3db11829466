"""The LM head chunk by chunk: token log-probs and token losses without a (B, T, V) tensor.

With a realistic vocabulary the LM head and the softmax over it are most of a small model's
step. The plain path (logprobs.completion_logprobs) materialises (B, T, V) logits, a log-softmax
and, under autograd, several more tensors of that size for the backward. Here:

- the backbone runs once and only the hidden states that predict completion tokens are kept,
  compacted to N real positions (no padding, no prompt columns);
- `token_logprobs_chunked` (no gradient: teachers, checks) projects chunk_tokens positions at a
  time and keeps only the log-prob of each position's token;
- `fused_token_loss` (the trainer) computes a per-token loss's gradient with respect to the
  hidden states and the head's weight inside the forward, chunk by chunk, the way fused
  linear-cross-entropy kernels do: logits -> log-softmax -> softmax in place -> two matrix
  multiplies, the per-token scaling applied on the (N, H) side. The head's FLOPs are the
  unfused forward + backward (2 + 4 per weight and position), with one (chunk_tokens, V)
  float buffer alive (two for a soft-capped head), reused from chunk to chunk. The loss itself stays a pure function of the
  token log-probs (objectives.py), differentiated by autograd on N numbers, so the maths is
  not written twice.

Supported heads: a plain `torch.nn.Linear` without bias, with no forward hooks on it or on the
model (`plain_head`), followed by the elementwise map the model's forward applies to its output,
if any (`models.post_head`: Gemma's final-logit soft-capping, Cohere's and Granite's logit
scaling), applied here to each chunk of logits, its derivative in the fused backward. Anything
else (a LoRA-wrapped head, a hook that edits logits, a scaling field on a model type whose use
of it opd does not know) takes the plain path. Left out: chunking the backbone (its activations
are (B, T, H), not V).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from opd.fast.upcast import compute_weight
from opd.logprobs import completion_hidden
from opd.models import IDENTITY, PostHead, inner_model, post_head

_scratch = threading.local()  # per thread: the teacher server scores requests in a thread pool


def scratch(
    rows: int, cols: int, dtype: torch.dtype, device: torch.device, slot: int = 0
) -> torch.Tensor:
    """A (rows, cols) buffer for one chunk of logits, reused from call to call on a CPU.

    A fresh allocation that large (512 x 32k floats is 64 MB) is mapped anew by the C
    allocator every time, and its first write page-faults: a large share of the LM head's
    matrix multiply on a CPU (`python benchmarks/hot_paths.py` measures it). CUDA's caching
    allocator already reuses memory, so other devices get a fresh tensor. The buffer stays
    allocated (the peak was that size anyway); inference-mode and normal tensors are kept
    apart, since one cannot be written in place under the other mode. Buffers in different
    slots are distinct (slot 1: the soft-cap derivative next to the logits, `_FusedTokenLoss`).
    """
    device = torch.device(device)
    if device.type != "cpu":
        return torch.empty(rows, cols, dtype=dtype, device=device)
    key = (dtype, torch.is_inference_mode_enabled(), slot)
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buf = buffers.get(key)
    if buf is None or buf.numel() < rows * cols:
        buf = buffers[key] = torch.empty(rows * cols, dtype=dtype)
    return buf[: rows * cols].view(rows, cols)


def head_logits(
    h_nH: torch.Tensor, weight_VH: torch.Tensor, post: PostHead = IDENTITY
) -> torch.Tensor:
    """float32 (n, V) logits post(h @ W.T) in a scratch buffer (valid until the next call).

    A float32 weight (the model's, or the copy `upcast.compute_weight` gives a half model on a
    CPU without half kernels) multiplies in float32; lower precision (bf16 weights, or
    autocast, which `out=` would bypass) multiplies in its own dtype first, as
    `(h @ W.T).float()` does; `post` (the model's soft-cap or logit scale) then acts on the
    float32 logits in place.
    """
    z_nV = scratch(h_nH.shape[0], weight_VH.shape[0], torch.float32, h_nH.device)
    if weight_VH.dtype == torch.float32 and not torch.is_autocast_enabled(h_nH.device.type):
        torch.mm(h_nH.float(), weight_VH.T, out=z_nV)  # float32, or upcast.compute_weight's
    else:
        z_nV.copy_(h_nH @ weight_VH.T)
    return post.apply_(z_nV)


def plain_head(model) -> torch.nn.Linear | None:
    """The model's LM head when the chunked paths can use its weight directly, else None.

    The chunked paths apply `models.post_head(model.config)` after it; None when that is not
    known. None also when a hook could change the logits (forward hooks on the head or the
    model, accelerate's offloading hooks): the chunked paths never call those modules' forward.
    """
    model = inner_model(model)
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    if post_head(model.config) is None:
        return None
    for module in (model, head):
        if module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"):
            return None
    return head


def token_logprobs_chunked(
    head: torch.nn.Linear,
    hidden_NH: torch.Tensor,
    tokens_N: torch.Tensor,
    vocab_size: int,
    chunk_tokens: int = 1024,
    post: PostHead = IDENTITY,
) -> torch.Tensor:
    """(N,) float32 log softmax(post(head(hidden)))[token] over the first vocab_size logits,
    no grad. post: the model's `models.post_head`."""
    weight_VH = compute_weight(head.weight, hidden_NH)[:vocab_size]
    lp_N = torch.empty(tokens_N.shape[0], dtype=torch.float32, device=hidden_NH.device)
    with torch.no_grad():
        for start in range(0, tokens_N.shape[0], chunk_tokens):
            sl = slice(start, start + chunk_tokens)
            lp_nV = log_softmax_chunk(head_logits(hidden_NH[sl], weight_VH, post))
            lp_N[sl] = lp_nV.gather(-1, tokens_N[sl, None]).squeeze(-1)
    return lp_N


def log_softmax_chunk(z_nV: torch.Tensor) -> torch.Tensor:
    """log_softmax(z_nV, -1) of a float32 chunk of logits, written over it on a CPU.

    torch's row kernel keeps a row in cache for its max, sum and output passes: less time than
    separate amax / sub / exp / sum passes over a chunk that is far larger than the cache
    (`python benchmarks/hot_paths.py`). On a CPU no second chunk is allocated: the kernel
    reads a whole row before it writes it (tests/test_heads.py checks the result against an
    out-of-place log_softmax, so a torch that changed this would fail there). Other devices,
    whose kernels that test does not run, get a fresh tensor from their caching allocator.
    """
    if z_nV.device.type != "cpu":
        return torch.log_softmax(z_nV, -1)
    return torch.log_softmax(z_nV, -1, out=z_nV)


def logprobs_at(
    head, hidden_NH, rows_N, cols_N, tokens_BT, vocab_size: int, chunk: int,
    post: PostHead = IDENTITY,
):  # fmt: skip
    """(B, T) float32: the log-prob of tokens_BT[rows_N, cols_N] given the hidden states that
    predict them (one per position, in that order), 0 elsewhere; no gradient. post: the
    model's `models.post_head` (shared_prompt.py leaves the identity: it runs only model types
    that have none)."""
    tokens_N = tokens_BT[rows_N, cols_N]
    lp_N = token_logprobs_chunked(head, hidden_NH, tokens_N, vocab_size, chunk, post)
    lp_BT = torch.zeros(tokens_BT.shape, dtype=torch.float32, device=tokens_BT.device)
    lp_BT[rows_N, cols_N] = lp_N
    return lp_BT


def score_completions(model, tokens_BT, attention_mask_BT, completion_mask_BT, vocab_size, chunk):
    """(B, T) log-probs of the completion tokens under model (0 elsewhere), no (B, T, V) tensor.

    Call under torch.inference_mode; the model must have a plain_head.
    """
    model = inner_model(model)
    hidden_NH, rows_N, cols_N, _ = completion_hidden(
        model, tokens_BT, attention_mask_BT, completion_mask_BT
    )
    head, post = plain_head(model), post_head(model.config)
    return logprobs_at(head, hidden_NH, rows_N, cols_N, tokens_BT, vocab_size, chunk, post)


# (lp_n leaf with requires_grad, slice of the N positions) -> this chunk's loss (0-d)
ChunkLoss = Callable[[torch.Tensor, slice], torch.Tensor]


class _FusedTokenLoss(torch.autograd.Function):
    """loss = sum over chunks of chunk_loss(log softmax(post(hidden @ W.T))[token]).

    Gradients for hidden and W are computed in the forward and scaled by the incoming gradient
    in the backward. Outputs: the loss (differentiable) and the (N,) log-probs (constants).
    With x = hidden @ W.T and z = post(x) (elementwise), d loss / dx = d loss / dz * post'(x):
    post' = slope * (1 - tanh(slope * x / cap)**2) with a soft-cap, the constant slope
    without (`models.PostHead`). The constant goes to the (n, H) side with g; the tanh factor
    is one more (n, V) buffer, kept from the forward's tanh.
    """

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, tokens_N, vocab_size, chunk_loss, chunk_tokens, post):
        N = tokens_N.shape[0]
        W_VH = compute_weight(weight_VH, hidden_NH)[:vocab_size]
        grad_h_NH = torch.empty_like(hidden_NH)
        # summed over chunks in float32 (a bf16 sum loses precision with every chunk added)
        grad_w_VH = None
        if ctx.needs_input_grad[1]:
            grad_w_VH = torch.zeros_like(weight_VH, dtype=torch.float32)
        lp_N = torch.empty(N, dtype=torch.float32, device=hidden_NH.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden_NH.device)
        for start in range(0, N, chunk_tokens):
            sl = slice(start, start + chunk_tokens)
            h_nH, tok_n1 = hidden_NH[sl], tokens_N[sl, None]
            z_nV = head_logits(h_nH, W_VH, PostHead(post.mul, post.div))  # x * slope
            tanh_grad_nV = None
            if post.cap is not None:  # cap * tanh(. / cap), keeping 1 - tanh**2 for the backward
                t_nV = z_nV.div_(post.cap).tanh_()
                tanh_grad_nV = scratch(*t_nV.shape, torch.float32, t_nV.device, slot=1)
                tanh_grad_nV.fill_(1.0).addcmul_(t_nV, t_nV, value=-1.0)
                z_nV = t_nV.mul_(post.cap)
            lp_nV = log_softmax_chunk(z_nV)
            lp_n = lp_nV.gather(-1, tok_n1).squeeze(-1)
            lp_N[sl] = lp_n
            with torch.enable_grad():
                leaf_n = lp_n.detach().requires_grad_()
                chunk = chunk_loss(leaf_n, sl)
                g_n = torch.zeros_like(lp_n)
                if chunk.requires_grad:
                    (g_n,) = torch.autograd.grad(chunk, leaf_n, materialize_grads=True)
            loss += chunk.detach()
            # d loss / d z = -g * (softmax - onehot): the (n, V) chunk is exp'd in place and the
            # one-hot subtracted at n entries; g's row scaling (and post's slope) acts on the
            # (n, H) side of each product instead of on the chunk (one pass over it fewer).
            d_nV = lp_nV.exp_().scatter_add_(-1, tok_n1, torch.full_like(lp_n[:, None], -1.0))
            if tanh_grad_nV is not None:
                d_nV.mul_(tanh_grad_nV)
            g_n1 = g_n[:, None]
            grad_h_NH[sl] = (d_nV.to(W_VH.dtype) @ W_VH).float().mul_(-post.slope * g_n1)
            if grad_w_VH is not None:
                grad_w_VH[:vocab_size].addmm_(d_nV.T, h_nH.float() * g_n1, alpha=-post.slope)
        if grad_w_VH is not None:
            grad_w_VH = grad_w_VH.to(weight_VH.dtype)
        ctx.save_for_backward(grad_h_NH, grad_w_VH)
        ctx.mark_non_differentiable(lp_N)
        return loss, lp_N

    @staticmethod
    def backward(ctx, grad_loss, _grad_lp):
        grad_h_NH, grad_w_VH = ctx.saved_tensors
        grad_w = None if grad_w_VH is None else grad_w_VH * grad_loss.to(grad_w_VH.dtype)
        return grad_h_NH * grad_loss.to(grad_h_NH.dtype), grad_w, None, None, None, None, None


def fused_token_loss(
    model,
    tokens_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor,
    completion_mask_BT: torch.Tensor,
    vocab_size: int,
    chunk_loss: ChunkLoss,
    chunk_tokens: int = 1024,
    hidden=None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """A per-token loss of the completion tokens' log-probs, differentiable into the model.

    chunk_loss(lp_n, sl) gets the log-probs of completion positions sl (in the order of
    completion_mask_BT.nonzero()) and returns their loss; the result is the sum over chunks.
    Returns (loss, lp_N as constants, (rows_N, cols_N)). The model must have a plain_head;
    its `models.post_head` (soft-cap, logit scale) is applied to the head's output.
    hidden: what `completion_hidden` returns, when the caller has it another way
    (`shared_prompt.shared_prompt_hidden`).
    """
    model = inner_model(model)
    head = plain_head(model)
    hidden_NH, rows_N, cols_N, tokens_N = hidden or completion_hidden(
        model, tokens_BT, attention_mask_BT, completion_mask_BT
    )
    loss, lp_N = _FusedTokenLoss.apply(
        hidden_NH, head.weight, tokens_N, vocab_size, chunk_loss, chunk_tokens,
        post_head(model.config),
    )  # fmt: skip
    return loss, lp_N, (rows_N, cols_N)
