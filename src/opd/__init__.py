"""opd: on-policy distillation of language models.

The student samples completions, the teacher scores every sampled token, and the student is
trained with an importance-sampled policy gradient whose per-token advantage is the negative
reverse KL to the teacher (Thinking Machines Lab, "On-Policy Distillation", 2025).
"""

from opd.errors import OpdError

__version__ = "0.1.0"
__all__ = ["OpdError", "__version__"]
