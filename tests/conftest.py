import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The tests never contact the Hugging Face hub and never read the user's cache: the preflight reads hub names'
# tokenizers (opd_verl.checks.preflight), so hub names in tests (Qwen/Qwen2-7B, ...) resolve offline against an empty
# cache and are skipped. Set before anything imports huggingface_hub (it reads these once), inherited by subprocesses.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = EMPTY_HF_HUB_CACHE = tempfile.mkdtemp(prefix="opd_verl_tests_hf_hub_")
atexit.register(shutil.rmtree, EMPTY_HF_HUB_CACHE, ignore_errors=True)


def run_main_opd(*overrides: str, timeout: float = 120, env: dict | None = None, cwd: Path = REPO
                 ) -> subprocess.CompletedProcess:
    """`python -m opd_verl.main_opd <overrides>` in a subprocess of this interpreter (from `cwd`)."""
    return subprocess.run(
        [sys.executable, "-m", "opd_verl.main_opd", *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """`datasets`' Arrow cache (data_preprocess loads local files through it) goes under tmp_path, not ~/.cache."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))


@pytest.fixture(scope="session")
def composed_config():
    """The default composed opd_trainer config (Hydra compose API), as a plain container factory."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "opd_verl" / "config"), version_base=None):
        cfg = compose(config_name="opd_trainer")
    container = OmegaConf.to_container(cfg, resolve=False)

    def make():
        import copy

        return copy.deepcopy(container)

    return make
