"""A small supervised fine-tuning (SFT) trainer for tiny models on CPU: plain PyTorch + transformers.

Teacher-forced next-token loss on chat-formatted examples, counted on the answer tokens only:

    text   = apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    target = answer + eos                                   # <|im_end|>: vLLM's and verl's stop token
    loss   = mean over answer tokens of -log p(target_t | text, target_<t)

The prompt ids are the ones verl's RL dataset feeds the rollout (the same chat template, no system prompt), so a
model trained here starts RL/OPD in exactly the format it learned.

    result = train_sft(model, tokenizer, prompts, answers, SFTConfig(steps=600, lr=2e-3))
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch


@dataclass(frozen=True)
class SFTConfig:
    steps: int = 500
    batch_size: int = 64
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50
    # call `eval_fn(step)` every this many steps (0 = never); training stops early once it returns a value
    # >= `target` (if set)
    eval_every: int = 0
    target: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class SFTResult:
    steps: int
    seconds: float
    final_loss: float
    history: list[dict] = field(default_factory=list)  # {"step", "loss", "lr", "seconds"[, "eval"]}
    evals: list[tuple[int, float]] = field(default_factory=list)


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of the chat-formatted user prompt with the assistant generation prefix (as verl builds them)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_examples(tokenizer, prompts: Sequence[str], answers: Sequence[str]) -> list[tuple[list[int], int]]:
    """[(prompt ids + answer ids + eos, number of prompt ids)] for every (prompt, answer) pair."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    eos = tokenizer.eos_token_id
    out = []
    for prompt, answer in zip(prompts, answers):
        p = chat_prompt_ids(tokenizer, prompt)
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
        out.append((p + a, len(p)))
    return out


def collate(examples: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels (-100 on prompt and padding)."""
    width = max(len(ids) for ids, _ in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(examples):
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[i, : len(ids)] = t
        attention[i, : len(ids)] = 1
        labels[i, n_prompt : len(ids)] = t[n_prompt:]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens of `batch` (labels != -100)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits = logits[:, :-1].float()
    shift_labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100
    )


def lr_at(step: int, cfg: SFTConfig) -> float:
    """Linear warm-up then cosine decay to lr * min_lr_ratio (step counts from 0)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_sft(
    model,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    cfg: SFTConfig = SFTConfig(),
    eval_fn: Callable[[int], float] | None = None,
    log: Callable[[str], None] | None = None,
    tag: str = "sft",
) -> SFTResult:
    """Train `model` in place on (prompt, answer) pairs; returns the loss history and timing.

    Batches are drawn by shuffling the examples each epoch (seeded). `eval_fn(step)` (e.g. greedy accuracy on a
    validation set) runs every `cfg.eval_every` steps and at the end; with `cfg.target` set, training stops as
    soon as it reaches the target.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    examples = encode_examples(tokenizer, prompts, answers)
    if not examples:
        raise ValueError("no SFT examples")
    pad = tokenizer.pad_token_id
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    order: list[int] = []
    result = SFTResult(steps=0, seconds=0.0, final_loss=float("nan"))
    start = time.monotonic()
    running = None
    model.train()
    step = 0
    for step in range(cfg.steps):
        lr = lr_at(step, cfg)
        for group in optim.param_groups:
            group["lr"] = lr
        if len(order) < cfg.batch_size:
            more = list(range(len(examples)))
            rng.shuffle(more)
            order.extend(more)
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        batch = collate([examples[i] for i in idx], pad)
        loss = answer_loss(model, batch)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optim.step()
        value = float(loss.detach())
        running = value if running is None else 0.9 * running + 0.1 * value
        done = step + 1
        if cfg.log_every and (done % cfg.log_every == 0 or done == cfg.steps):
            elapsed = time.monotonic() - start
            result.history.append({"step": done, "loss": running, "lr": lr, "seconds": elapsed})
            log(f"[{tag}] step {done}/{cfg.steps} loss {running:.4f} lr {lr:.2e} ({elapsed:.0f}s)")
        if eval_fn is not None and cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            model.eval()
            score = eval_fn(done)
            model.train()
            result.evals.append((done, score))
            log(f"[{tag}] step {done}: eval {score:.3f}")
            if cfg.target is not None and score >= cfg.target:
                break
    model.eval()
    result.steps = step + 1
    result.final_loss = running if running is not None else float("nan")
    if eval_fn is not None and (not result.evals or result.evals[-1][0] != result.steps):
        score = eval_fn(result.steps)
        result.evals.append((result.steps, score))
        log(f"[{tag}] step {result.steps}: eval {score:.3f}")
    result.seconds = time.monotonic() - start
    return result
