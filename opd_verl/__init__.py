"""opd_verl: on-policy distillation for LLMs as a plugin on top of verl."""

#: the release (docs/CHANGELOG.md); deprecated names say the release that removes them (opd_verl.checks.modes)
__version__ = "0.2.0"
