"""The demo recipe's OPD as a plain PyTorch + transformers loop (no verl): the reference main_opd is compared with.

    .venv/bin/python bench/reference_loop.py --mode sampled --seed 0 --steps 30    # prints one JSON line per step

It mirrors recipes/demo_cpu.yaml plus verl 0.9.1's defaults, setting by setting:
* data: the demo's train parquet in verl's order, torch.randperm(len, generator seeded with data.seed) (verl's
  create_rl_sampler with shuffle=True), 32 prompts a step, each sampled n=4 times; the prompt = the chat template
  with add_generation_prompt, as verl's dataset renders it.
* rollout: temperature 1, top_p 1, top_k off (verl: -1), max 32 new tokens, stop at the tokenizer's EOS
  (<|im_end|>); the response keeps its EOS token and every token after it is masked (verl's response_mask).
* advantage (sampled): A_t = clip(q_t - s_t, -5, 5) with s the student's log-prob before the update (verl's
  old_log_probs) and q the teacher's; loss = token-mean over the batch's response tokens of -A_t * ratio_t, with
  ratio = exp(s - s_old) = 1 (one optimizer step per batch); verl's loss_agg_mode=token-mean.
* full vocabulary (ppo_plus_distill, lambda_rl=0, support=full, reverse_kl): loss = token-mean of
  KL(pi_s || pi_t) over the vocabulary at every response token (opd_verl.algorithms.divergences.full_divergence).
* the baselines of bench/sample_efficiency_loop.py: grpo (adv_estimator=grpo, no teacher in the loss): the
  exact-match reward of each sample normalized within its prompt's n samples (verl's
  compute_grpo_outcome_advantage) on every response token, verl's PPO clip loss (compute_policy_loss_vanilla,
  clip 0.2, dual clip 3); sft: token-mean NLL of the teacher's own samples (T=1), every step.
* optimizer: torch AdamW(lr 3e-4, betas (0.9, 0.999), eps 1e-8, weight_decay 0); verl's constant schedule with
  lr_warmup_steps=5: update k (1-based) uses lr * min(1, (k-1)/5) (the first update has lr 0); grad-norm clip 1.
* logging as verl does: step k's opd/kl_per_token = mean over response tokens of s_old - q on step k's batch
  (before update k); the greedy validation (all val prompts, 32 tokens, opd_verl.rewards) at step 0 and after
  every test_freq-th update and the last one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

VAL_KEY = "val-core/openai/gsm8k/acc/mean@1"  # the key verl logs for the demo's val split
MODES = ("sampled", "full", "grpo", "sft")


@dataclass
class LoopConfig:
    mode: str = "sampled"  # sampled | full (OPD); grpo | sft (the baselines)
    divergence: str = "reverse_kl"  # full mode: opd.divergence (reverse_kl | forward_kl | jsd)
    seed: int = 0
    steps: int = 30
    test_freq: int = 5
    prompts: int = 32  # data.train_batch_size
    n: int = 4  # rollout.n
    max_new_tokens: int = 32  # data.max_response_length
    temperature: float = 1.0
    lr: float = 3e-4
    warmup_steps: int = 5
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adv_clip: tuple = (-5.0, 5.0)
    # knobs the demo recipe leaves at verl's defaults (bench/opd_speed.py sweeps them)
    mini_batches: int = 1  # updates per step: verl's ppo_mini_batch_size = prompts / mini_batches
    epochs: int = 1  # verl's ppo_epochs
    discount: float = 0.0  # opd.discount: A_t = sum_{j>=t} discount^(j-t) r_j
    sft_steps: int = 0  # staged: the first sft_steps steps are SFT (token-mean NLL) on teacher samples, then OPD
    schedule: str = "constant"  # optim.lr_scheduler_type: constant | cosine (to min_lr_ratio at the last step)
    min_lr_ratio: float = 0.0  # optim.min_lr_ratio (cosine)


# ---- the math (tested in tests/test_bench_parity.py) ---------------------------------------------------------


def response_mask(responses: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including each row's first EOS, 0 after it (all 1 for a row that never ends)."""
    is_eos = (responses == eos_id).long()
    return ((is_eos.cumsum(-1) - is_eos) == 0).long()


def opd_advantage(q: torch.Tensor, s_old: torch.Tensor, mask: torch.Tensor, lo: float, hi: float,
                  discount: float = 0.0) -> torch.Tensor:
    from opd_verl.algorithms.advantages import discounted_reward_to_go

    return discounted_reward_to_go((q - s_old).clamp(lo, hi) * mask, mask, discount)


def token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def sampled_opd_loss(s: torch.Tensor, q: torch.Tensor, mask: torch.Tensor, lo: float, hi: float,
                     s_old: torch.Tensor | None = None, discount: float = 0.0) -> torch.Tensor:
    """Importance-sampling loss, token-mean of -A*ratio with ratio exp(s - s_old); s_old = the log-probs before the
    step's first update (s itself, ratio 1, when there is one update per step)."""
    s_old = s.detach() if s_old is None else s_old
    return token_mean(-opd_advantage(q, s_old, mask, lo, hi, discount) * torch.exp(s - s_old), mask)


def grpo_advantage(scores: torch.Tensor, n: int, eps: float = 1e-6) -> torch.Tensor:
    """verl's compute_grpo_outcome_advantage per sample, each prompt's n samples in adjacent rows: (r - mean) /
    (std + eps) within the group, std unbiased; a prompt with one sample keeps r (verl: mean 0, std 1)."""
    if n == 1:
        return scores / (1 + eps)
    groups = scores.view(-1, n)
    return ((groups - groups.mean(-1, keepdim=True)) / (groups.std(-1, keepdim=True) + eps)).view(-1)


def ppo_clip_loss(s: torch.Tensor, s_old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, clip: float = 0.2,
                  clip_c: float = 3.0) -> torch.Tensor:
    """verl's compute_policy_loss_vanilla, token-mean: max(-A r, -A clip(r, 1 -/+ clip)), and for A < 0 at most
    -A clip_c (dual clip); r = exp(s - s_old), the log-ratio clamped to +-20."""
    ratio = torch.exp((s - s_old).clamp(-20.0, 20.0))
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    return token_mean(torch.where(adv < 0, torch.minimum(loss, -adv * clip_c), loss), mask)


def full_opd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                  divergence: str = "reverse_kl") -> torch.Tensor:
    from opd_verl.algorithms.divergences import full_divergence

    return token_mean(full_divergence(student_logits, teacher_logits, divergence), mask)


def prompt_batches(rows: int, prompts: int, steps: int, seed: int) -> list[list[int]]:
    """The prompt indices of each step as verl's dataloader yields them: one torch.randperm per epoch from one
    generator seeded with data.seed (RandomSampler), `prompts` per batch, the last partial batch dropped."""
    g, out = torch.Generator().manual_seed(seed), []
    while len(out) < steps:
        perm = torch.randperm(rows, generator=g).tolist()
        out += [perm[i : i + prompts] for i in range(0, rows - prompts + 1, prompts)]
    return out[:steps]


def warmup_factor(update: int, warmup_steps: int) -> float:
    """verl's get_constant_schedule_with_warmup as LambdaLR applies it: update k (1-based) gets (k-1)/warmup."""
    return min(1.0, (update - 1) / max(1.0, warmup_steps))


def cosine_factor(update: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """verl's get_cosine_schedule_with_warmup (num_cycles 0.5, zero-indexed steps) for update k (1-based): linear
    warm-up, then a half cosine from 1 to min_lr_ratio over the remaining total_steps - warmup_steps updates."""
    i = update - 1
    if i < warmup_steps:
        return i / max(1, warmup_steps)
    progress = (i - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(min_lr_ratio, math.cos(math.pi * progress) * (1 - min_lr_ratio) / 2 + (1 + min_lr_ratio) / 2)


def lr_factor(update: int, cfg: LoopConfig) -> float:
    if cfg.schedule == "cosine":
        return cosine_factor(update, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    if cfg.schedule != "constant":
        raise ValueError(f"schedule={cfg.schedule!r}: expected constant or cosine")
    return warmup_factor(update, cfg.warmup_steps)


# ---- the loop ------------------------------------------------------------------------------------------------


def logits_and_logprobs(model, seqs, attn, width: int):
    """Logits at the positions predicting the response tokens [B, R, V] and the log-probs of those tokens."""
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens, as verl's
    logits = model(input_ids=seqs, attention_mask=attn, position_ids=pos).logits[:, width - 1 : -1].float()
    labels = seqs[:, width:]
    return logits, torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def run(cfg: LoopConfig, built=None, log=print, threads: int | None = None) -> dict[int, dict[str, float]]:
    """Train the demo's student for cfg.steps steps; returns {step: metrics} under verl's metric names. `threads`:
    torch's intra-op threads (default: opd_verl.demo.build.pick_threads)."""
    import pyarrow.parquet as pq

    from opd_verl.demo.build import build, pick_threads
    from opd_verl.evaluate import greedy_accuracy, load_model, load_rows, render_prompts
    from opd_verl.rewards import compute_score

    if cfg.mode not in MODES:
        raise ValueError(f"mode={cfg.mode!r}: expected one of {', '.join(MODES)}")
    torch.set_num_threads(threads or pick_threads())  # 1 on a busy machine: spinning OpenMP threads make a step 10x slower
    built = built or build()
    student, tok = load_model(built.student)
    teacher, _ = load_model(built.teacher)
    train = pq.read_table(built.data["train"]).to_pylist()
    val_rows = load_rows(built.data["val"])
    prompt_ids = render_prompts(tok, [list(r["prompt"]) for r in train])
    batches = prompt_batches(len(train), cfg.prompts, cfg.steps, cfg.seed)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i + 1, cfg))
    eos, pad = tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(cfg.seed)
    metrics: dict[int, dict[str, float]] = {}

    def validate(step):
        rng = torch.get_rng_state()  # opd_verl.evaluate reseeds the global RNG; keep the sampling stream
        metrics.setdefault(step, {})[VAL_KEY] = greedy_accuracy(student, tok, val_rows, cfg.max_new_tokens)
        torch.set_rng_state(rng)

    validate(0)
    for step in range(1, cfg.steps + 1):
        t0 = time.monotonic()
        idx = [i for i in batches[step - 1] for _ in range(cfg.n)]
        width = max(len(prompt_ids[i]) for i in idx)
        seqs = torch.full((len(idx), width), pad)
        attn = torch.zeros_like(seqs)
        for row, i in enumerate(idx):
            seqs[row, width - len(prompt_ids[i]) :] = torch.tensor(prompt_ids[i])
            attn[row, width - len(prompt_ids[i]) :] = 1
        sft = step <= cfg.sft_steps or cfg.mode == "sft"
        sampler = teacher if sft else student
        student.eval()
        with torch.no_grad():
            out = sampler.generate(input_ids=seqs, attention_mask=attn, do_sample=True, temperature=cfg.temperature,
                                   top_p=1.0, top_k=0, max_new_tokens=cfg.max_new_tokens, eos_token_id=eos,
                                   pad_token_id=pad)
        resp = out[:, width:]
        mask = response_mask(resp, eos)
        full_attn = torch.cat([attn, mask], dim=1)
        mf = mask.float()
        texts = tok.batch_decode([r[m.bool()] for r, m in zip(resp, mask)], skip_special_tokens=True)
        scores = [compute_score(train[i]["data_source"], t, train[i]["reward_model"]["ground_truth"]) for i, t in zip(idx, texts)]
        if cfg.mode == "grpo":
            adv = grpo_advantage(torch.tensor(scores, dtype=torch.float32), cfg.n).unsqueeze(-1) * mf
        with torch.no_grad():
            t_logits, q = logits_and_logprobs(teacher, out, full_attn, width)
            s_old = logits_and_logprobs(student, out, full_attn, width)[1]  # verl's old_log_probs
        student.train()
        rows = torch.arange(len(idx)).chunk(cfg.mini_batches)  # contiguous, as verl splits (actor.shuffle=false)
        lr_used, losses = opt.param_groups[0]["lr"], []
        for _ in range(cfg.epochs):
            for r in rows:
                s_logits, s = logits_and_logprobs(student, out[r], full_attn[r], width)
                if sft:
                    loss = token_mean(-s, mf[r])
                elif cfg.mode == "sampled":
                    loss = sampled_opd_loss(s, q[r], mf[r], *cfg.adv_clip, s_old=s_old[r], discount=cfg.discount)
                elif cfg.mode == "grpo":
                    loss = ppo_clip_loss(s, s_old[r], adv[r], mf[r])
                else:
                    loss = full_opd_loss(s_logits, t_logits[r], mf[r], cfg.divergence)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad)
                opt.step()
                losses.append(loss.item())
        sched.step()  # verl steps the scheduler once per training step, after all its updates
        mean_loss = sum(losses) / len(losses)  # over the step's updates
        m = metrics.setdefault(step, {})
        m.update({
            "opd/kl_per_token": token_mean(s_old - q, mf).item(),
            "critic/score/mean": sum(scores) / len(scores),
            "response_length/mean": mf.sum(-1).mean().item(),
            "response_length/clip_ratio": (mf.sum(-1) == cfg.max_new_tokens).float().mean().item(),
            "actor/pg_loss": mean_loss,
            "actor/grad_norm": grad_norm.item(),
            "actor/lr": sched.get_last_lr()[0],  # as verl logs it: after the scheduler's step (the next update's)
            "actor/lr_used": lr_used,
            "tokens": full_attn.sum().item(),  # prompt + response tokens of the step's samples (FLOPs)
            "timing_s/step": time.monotonic() - t0,
        })
        if sft:
            m["sft/nll_per_token"] = mean_loss
        elif cfg.mode == "full":
            m["opd/divergence_per_token"] = mean_loss
        if step % cfg.test_freq == 0 or step == cfg.steps:
            validate(step)
        log(json.dumps({"step": step, **{k: round(v, 5) for k, v in m.items()}}))
    return metrics


def parse_overrides(items) -> dict:
    """["mini_batches=4", "betas=0.9,0.99"] -> {"mini_batches": 4, "betas": (0.9, 0.99)}, typed by LoopConfig."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in LoopConfig.__dataclass_fields__:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(LoopConfig.__dataclass_fields__)}")
        default = getattr(LoopConfig, key)
        out[key] = tuple(float(v) for v in value.split(",")) if isinstance(default, tuple) else type(default)(value)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in ("mode", "seed", "steps", "test_freq", "lr"):
        default = getattr(LoopConfig, f)
        p.add_argument("--" + f.replace("_", "-"), type=type(default), default=default)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other LoopConfig field, e.g. --set mini_batches=4 --set betas=0.9,0.99")
    p.add_argument("--json", help="write {step: metrics} here")
    args = p.parse_args(argv)
    cfg = LoopConfig(mode=args.mode, seed=args.seed, steps=args.steps, test_freq=args.test_freq, lr=args.lr,
                     **parse_overrides(args.set))
    metrics = run(cfg)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": asdict(cfg), "metrics_by_step": metrics}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
