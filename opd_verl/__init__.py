"""opd_verl: on-policy distillation for LLMs as a plugin on top of verl."""

__version__ = "0.1.0"
