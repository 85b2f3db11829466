"""Completions of exactly max_new_tokens in a benchmark: opd's samplers never draw EOS.

The logits of each decode step get EOS set to -inf before the draw (in place, no copy), so the
measured work is rows x max_new_tokens whatever the random models prefer. Only sampling sees
it: the trainer and the teacher score EOS with its real probability, as TRL's loss does with
the forward hook vs_trl.py puts on TRL's student head. (A hook on opd's head would work too,
but opd then leaves the chunked LM-head paths, which never call the head's forward.)
"""

from __future__ import annotations

import opd.fast.decode as kv_sampler
import opd.samplers.hf as hf_sampler


def never_sample_eos(eos_id: int) -> None:
    draw = hf_sampler.sample_token

    def draw_without_eos(logits_BV, *args, **kwargs):
        logits_BV[:, eos_id] = float("-inf")
        return draw(logits_BV, *args, **kwargs)

    hf_sampler.sample_token = kv_sampler.sample_token = draw_without_eos
