"""opd_verl.export's config clean-up: a CPU run's attention kernel is not written into the exported model."""

from __future__ import annotations

import json

from opd_verl.export import drop_cpu_attention


def test_the_cpu_kernel_is_dropped_from_the_exported_config_and_other_attentions_kept(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "qwen2", "attn_implementation": "opd_cpu_varlen"}))
    assert drop_cpu_attention(path) is True
    assert json.loads(path.read_text()) == {"model_type": "qwen2"}  # transformers' default applies on load
    path.write_text(json.dumps({"model_type": "qwen2", "attn_implementation": "flash_attention_2"}))
    assert drop_cpu_attention(path) is False
    assert json.loads(path.read_text())["attn_implementation"] == "flash_attention_2"
