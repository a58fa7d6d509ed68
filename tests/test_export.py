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


def test_a_cpu_runs_checkpoint_loads_for_evaluation(tmp_path):
    """verl writes the training attention into the checkpoint's config.json; a CPU run's (opd_cpu_varlen) is not
    registered in a process without opd_verl's CPU support: opd_verl.evaluate loads such a checkpoint with sdpa."""
    import subprocess
    import sys

    from opd_verl.demo.tiny_models import build_model_dir

    model_dir = build_model_dir(tmp_path / "m", hidden_size=64, head_dim=32)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "attn_implementation": "opd_cpu_varlen"}))
    code = ("from opd_verl.evaluate import load_model; m, _ = load_model(%r); "
            "print(m.config._attn_implementation)" % model_dir)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})  # a fresh process, verl not imported
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "sdpa"
