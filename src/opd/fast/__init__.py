"""Code that exists only for speed, behind one switch: `run.fast_paths` (default true).

- `llama.py`: the Llama-family decoder layer (Llama, Qwen2, Qwen3, Mistral), written once, and
  `kv_supported`, which says whether it reproduces a model's forward;
- `decode.py`: `KVCacheSampler`, a decode loop over a preallocated KV cache;
- `shared_prompt.py`: each distinct prompt run once for the G rows that share it, for the
  teacher's scoring (inference) and the trainer's forward (differentiable), one function;
- `heads.py`: the LM head chunk by chunk, with the trainer's token loss fused into it;
- `packed.py`: float32 CPU linears through oneDNN with weights packed once;
- `upcast.py`: bf16/fp16 linears multiplied in float32 on a CPU without kernels for them.

Samplers, teachers and the trainer call in here; nothing here imports them. Each piece is
tested equal to the plain Hugging Face forward (`logprobs.py`, `samplers/hf.py`), and
`run.fast_paths=false` runs that plain forward everywhere, to bisect a numerical difference.
"""
