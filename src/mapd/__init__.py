"""mapd: mistake-aware peer-review distillation from a committee of teacher LLMs."""

__version__ = "0.1.0"
