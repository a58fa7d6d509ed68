"""Export the student of a verl FSDP checkpoint as a Hugging Face model directory (for opd_verl.evaluate, vLLM,
transformers).

    python -m opd_verl.export --checkpoint CKPT/global_step_N --out DIR

--checkpoint is a `global_step_N` folder (its `actor/` is read) or the `actor/` folder itself. What verl 0.9.1's
FSDP checkpoint manager wrote there decides the path:

- a full model in `actor/huggingface/` (`actor_rollout_ref.actor.checkpoint.save_contents` with `hf_model`, as
  every recipe sets) and no LoRA: it is copied to DIR;
- otherwise the FSDP shards `actor/model_world_size_W_rank_R.pt` are merged with verl's own model merger
  (`verl.model_merger`, FSDPModelMerger: the same as `python -m verl.model_merger merge --backend fsdp`); for a LoRA
  student (`actor/lora_train_meta.json`, adapter weights in the shards) verl's merger writes the base weights and a
  separate `lora_adapter/`; the adapter is then merged into the base with peft's `merge_and_unload`, so DIR is a
  plain model (the adapter is kept beside it in DIR/lora_adapter/). (verl's `hf_model` of a LoRA student is the PeftModel's state dict under the base model's class,
  which transformers cannot load as such: LoRA checkpoints are always merged from the shards.)

DIR then holds config.json, the weights (safetensors; bfloat16 when merged, as verl's merger casts the shards; the
LoRA merge itself runs in float32) and the tokenizer; it is loaded back with transformers before the command returns (no missing or unexpected weights).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from opd_verl.checks.verl_config import CPU_VARLEN_ATTENTION


class ExportError(Exception):
    pass


def actor_dir(checkpoint: str | os.PathLike) -> Path:
    """The actor folder of a global_step_N checkpoint (or the actor folder itself)."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise ExportError(f"--checkpoint {path}: no such directory (a trainer.default_local_dir/global_step_N folder)")
    for candidate in (path / "actor", path):
        if (candidate / "fsdp_config.json").is_file() or (candidate / "huggingface" / "config.json").is_file():
            return candidate
    raise ExportError(f"--checkpoint {path}: no actor checkpoint in it (neither actor/fsdp_config.json nor "
                      f"actor/huggingface/config.json); give a global_step_N folder of an FSDP run")


def has_weights(hf_dir: Path) -> bool:
    return any(hf_dir.glob("*.safetensors")) or any(hf_dir.glob("pytorch_model*.bin"))


def is_lora(actor: Path) -> bool:
    return (actor / "lora_train_meta.json").is_file()


def verify(out: Path) -> dict:
    """Load DIR with transformers (float32, CPU): every weight present, none left over. Returns a summary."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    AutoTokenizer.from_pretrained(out)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ExportError(f"{out}: transformers loads it with {bad}")
    return {"parameters": sum(p.numel() for p in model.parameters()), "architecture": type(model).__name__}


def _copy_hf(src: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file():
            shutil.copy2(item, out / item.name)


def _merge_shards(actor: Path, target: Path) -> Path | None:
    """verl's FSDP model merger into `target`; returns its lora_adapter/ folder, if it wrote one."""
    from verl.model_merger.base_model_merger import ModelMergerConfig
    from verl.model_merger.fsdp_model_merger import FSDPModelMerger

    if not (actor / "fsdp_config.json").is_file():
        raise ExportError(f"{actor}: no fsdp_config.json, so no FSDP shards to merge")
    config = ModelMergerConfig(operation="merge", backend="fsdp", local_dir=str(actor), target_dir=str(target),
                               hf_model_config_path=str(actor / "huggingface"))
    FSDPModelMerger(config).merge_and_save()
    adapter = target / "lora_adapter"
    return adapter if adapter.is_dir() else None


def _merge_lora(base_dir: Path, adapter: Path, out: Path) -> None:
    """The adapter merged into the base in float32, saved in bfloat16 (the dtype of verl's merger)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.to(torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    gen = base_dir / "generation_config.json"
    if gen.is_file():
        shutil.copy2(gen, out / gen.name)


def export(checkpoint: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write the checkpoint's student to `out` as an HF model directory; returns what was done."""
    actor = actor_dir(checkpoint)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"--out {out}: exists and is not empty")
    hf = actor / "huggingface"
    lora = is_lora(actor)
    if has_weights(hf) and not lora:
        _copy_hf(hf, out)
        how = "copied the hf_model verl saved"
    else:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.merge-") as tmp:
            target = out if not lora else Path(tmp)
            adapter = _merge_shards(actor, target)
            if adapter is None and lora:
                raise ExportError(f"{actor}: lora_train_meta.json says LoRA, but the shards hold no lora_ weights")
            if adapter is not None:
                _merge_lora(target, adapter, out)
                shutil.copytree(adapter, out / "lora_adapter")  # the adapter on its own too (peft, vLLM's LoRA)
                how = "merged the FSDP shards (verl.model_merger) and the LoRA adapter into the base (peft)"
            else:
                how = "merged the FSDP shards (verl.model_merger)"
    summary = {"checkpoint": str(actor), "out": str(out), "how": how, "lora": lora}
    if drop_cpu_attention(out / "config.json"):
        summary["how"] += f"; config.json: attn_implementation={CPU_VARLEN_ATTENTION} (a CPU run's) dropped"
    summary.update(verify(out))
    return summary


def names_cpu_attention(model_dir: str | os.PathLike) -> bool:
    """A CPU run trains with opd_verl's attention kernel, which verl writes into the checkpoint's config.json; it
    exists only where opd_verl's CPU support is loaded (docs/cpu.md). True when `model_dir`'s config names it."""
    config_path = Path(model_dir) / "config.json"
    return config_path.is_file() and json.loads(config_path.read_text()).get("attn_implementation") == CPU_VARLEN_ATTENTION


def drop_cpu_attention(config_path: Path) -> bool:
    """The exported config leaves a CPU run's attention kernel out (transformers' default then applies). True when it
    was there."""
    if not names_cpu_attention(config_path.parent):
        return False
    config = json.loads(config_path.read_text())
    del config["attn_implementation"]
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m opd_verl.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="trainer.default_local_dir/global_step_N")
    parser.add_argument("--out", required=True, metavar="DIR", help="HF model directory to write (new or empty)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        summary = export(args.checkpoint, args.out)
    except ExportError as exc:
        print(f"opd_verl.export: error: {exc}", file=sys.stderr)
        return 2
    print(f"opd_verl.export: {summary['how']}: {summary['out']} ({summary['architecture']}, "
          f"{summary['parameters']:,} parameters)")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
