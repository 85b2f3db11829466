"""Tiny models and a character tokenizer built locally: for tests, the quickstart and demos.

Nothing here touches a model hub. The tokenizer is a `tokenizers` WordLevel model over single
characters, saved with `save_pretrained` so `AutoTokenizer.from_pretrained` loads it offline.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

CHARS = string.digits + string.ascii_lowercase + "+-*/=:;,.()?! \n"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def char_tokenizer(chars: str = CHARS, add_bos: bool = True):
    """A character-level fast tokenizer: <pad>=0, <s>=1 (BOS, added when add_bos), </s>=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(set(chars)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 1)]
        )
    return wrap(tok)


def wrap(tok):
    """A `tokenizers` Tokenizer as a transformers fast tokenizer with opd's special tokens."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def bpe_tokenizer(texts: list[str], vocab_size: int = 96, chars: str = CHARS):
    """A byte-pair tokenizer trained here on `texts` (merges over the same characters): another
    vocabulary than `char_tokenizer`'s, for cross-tokenizer teachers. <s> BOS is added, </s> is
    EOS; a text is encoded whole (no pre-tokenizer), so merges may span spaces."""
    from tokenizers import Tokenizer, decoders, models, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "</s>", "<s>", "<pad>"],  # other ids than char_tokenizer's
        initial_alphabet=sorted(set(chars)),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    return wrap(tok)


def tiny_model(
    tokenizer,
    arch: str = "llama",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 256,
    vocab_pad: int = 0,
    seed: int = 0,
    intermediate: int | None = None,
    tied: bool = False,
    head_dim: int | None = None,
):
    """A randomly initialised Llama or Qwen3 causal LM sized for CPU tests.

    vocab_pad adds embedding rows beyond the tokenizer, as Qwen does (151936 -> 152064); tied
    shares the input embedding with the LM head, as small released models do; head_dim
    (default hidden // heads) as Qwen3, whose heads are wider than hidden // heads.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    common = dict(
        vocab_size=len(tokenizer) + vocab_pad,
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tied,
        head_dim=head_dim or hidden // heads,
    )
    if arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "qwen3":
        config = Qwen3Config(**common)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def save(model, tokenizer, path: str | Path) -> Path:
    """save_pretrained of both, without the progress bar newer transformers print to stderr."""
    from transformers.utils import logging as hf_logging

    path = Path(path)
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(path))
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(str(path))
    return path


def fit(
    model,
    tokenizer,
    pairs: list[tuple[str, str]],
    steps: int,
    lr: float = 3e-3,
    batch_size: int = 32,
    seed: int = 0,
) -> float:
    """Teacher-forced cross-entropy on the completions of (prompt, completion) pairs (EOS added).

    Used to make teachers with a known behaviour; returns the last batch's mean loss.
    """
    from opd.data import pack
    from opd.logprobs import completion_logprobs

    g = torch.Generator().manual_seed(seed)
    enc = [
        (
            tokenizer(p)["input_ids"],
            tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
        )
        for p, c in pairs
    ]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        idx = torch.randint(len(enc), (batch_size,), generator=g).tolist()
        tokens_BT, attn_BT, mask_BT, plen = pack(
            [enc[i][0] for i in idx], [enc[i][1] for i in idx], tokenizer.pad_token_id
        )
        lp_BT = completion_logprobs(model, tokens_BT, attn_BT, plen, len(tokenizer))
        loss = -lp_BT[mask_BT].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()
