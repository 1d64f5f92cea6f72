"""Training loop for the chapter-7 experiments: AdamW, warm-up + cosine decay, clipping, seeds, resume.

:func:`train` trains one :class:`~lambdaskip.models.SequenceModel` on one
:class:`~lambdaskip.tasks.TaskData` and returns a :class:`TrainResult` whose ``history`` holds,
at every evaluation (before training and after every epoch): the step, the mean train loss since
the last evaluation, the test loss and accuracy, every block's λ and the normalised μ of every
layer on a fixed evaluation batch. λ is also logged every ``log_every`` optimiser steps.

Determinism: the model is initialised from ``seed``, and the batch order of epoch e comes from a
generator seeded with ``(seed, e)``; nothing else is random. That makes resuming exact: a run
interrupted after any epoch and resumed from its checkpoint ends with the same parameters and the
same history as an uninterrupted run (a test checks it).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ._checks import check_choice, check_positive_int
from .models import build_model
from .profiles import seed_everything
from .tasks import IGNORE_INDEX, TaskData

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "warmup_cosine", "lam_setting_label"]


@dataclass
class TrainConfig:
    """Everything that defines one training run (saved with its results).

    ``lam`` is the fixed λ, or the initial value when ``learnable_lambda`` is True.
    ``warmup`` is the fraction of all optimiser steps spent warming up linearly from 0;
    afterwards the learning rate decays as a cosine to ``min_lr_ratio · lr``.
    """

    arch: str = "transformer"
    lam: float = 1.0
    learnable_lambda: bool = False
    seed: int = 0
    d_model: int = 64
    depth: int = 2
    n_heads: int = 2
    norm: str = "layernorm"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: float = 0.1
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    eval_batch: int = 64
    log_every: int = 10
    mixer_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("seed",):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative int, got {getattr(self, name)!r}")
        for name in ("d_model", "depth", "n_heads", "epochs", "batch_size", "eval_batch", "log_every"):
            check_positive_int(getattr(self, name), name)
        for name in ("lr", "grad_clip"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0.0 <= float(self.warmup) < 1.0:
            raise ValueError(f"warmup must be a fraction in [0, 1), got {self.warmup!r}")
        if not 0.0 <= float(self.min_lr_ratio) <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not isinstance(self.lam, (int, float)) or isinstance(self.lam, bool) or not math.isfinite(self.lam):
            raise ValueError(f"lam must be a finite real number, got {self.lam!r}")
        check_choice(self.norm, "norm", ("layernorm", "rmsnorm"))
        if not isinstance(self.mixer_kwargs, dict):
            raise TypeError(f"mixer_kwargs must be a dict, got {type(self.mixer_kwargs).__name__}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")

    @property
    def setting(self) -> str:
        return lam_setting_label(self.lam, self.learnable_lambda)


def lam_setting_label(lam: float, learnable: bool) -> str:
    """``"learnable"`` (from λ=1), ``"learnable(λ0=…)"`` or ``"λ=…"`` for fixed values."""
    if learnable:
        return "learnable" if lam == 1.0 else f"learnable(λ0={lam:g})"
    return f"λ={lam:g}"


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        config: the :class:`TrainConfig` as a dict.
        history: list of evaluation records (dicts with ``epoch, step, train_loss, test_loss,
            test_acc, lambdas (K), mu (K+1), time_s``).
        lambda_log: list of ``(step, [λ_1..λ_K])`` every ``log_every`` steps.
        final_acc, best_acc: test accuracy after the last epoch and the best over epochs.
        seconds: wall time of the training (summed over resumed pieces).
        model: the trained model.
    """

    config: dict
    history: list
    lambda_log: list
    final_acc: float
    best_acc: float
    seconds: float
    completed: bool
    model: nn.Module | None = field(default=None, repr=False)

    def summary(self) -> dict:
        last = self.history[-1]
        return dict(
            **{k: self.config[k] for k in ("arch", "seed")},
            setting=lam_setting_label(self.config["lam"], self.config["learnable_lambda"]),
            final_acc=self.final_acc,
            best_acc=self.best_acc,
            final_lambdas=list(last["lambdas"]),
            final_mu=list(last["mu"]),
            seconds=self.seconds,
        )


def warmup_cosine(step: int, total: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warm-up to 1 over ``warmup_steps``, then cosine to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _loss_and_correct(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Mean cross-entropy over scored positions, number correct, number scored."""
    if logits.dim() == 3:  # per-token targets: only non-ignored positions count
        logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
    mask = y != IGNORE_INDEX
    loss = nn.functional.cross_entropy(logits, y, ignore_index=IGNORE_INDEX)
    correct = int((logits.argmax(-1)[mask] == y[mask]).sum())
    return loss, correct, int(mask.sum())


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> tuple[float, float]:
    """Mean test loss (per scored position) and accuracy of ``model`` on ``(x, y)``."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for i in range(0, x.shape[0], batch_size):
        loss, c, n = _loss_and_correct(model(x[i : i + batch_size]), y[i : i + batch_size])
        total_loss += loss.item() * n
        correct += c
        count += n
    model.train()
    return total_loss / max(count, 1), correct / max(count, 1)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # λ, norms, biases, embeddings and positions get no weight decay: decay would pull λ towards 0
    # and bias exactly the quantity this experiment measures.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or name.endswith(".lam") or "embed" in name or name == "pos" or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def train(
    data: TaskData,
    config: TrainConfig | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    stop_after_epoch: int | None = None,
    progress: bool = True,
    device: torch.device | str = "cpu",
    **overrides,
) -> TrainResult:
    """Train one model on ``data``.

    Args:
        data: the task (:func:`lambdaskip.tasks.mqar` or :func:`lambdaskip.tasks.sequential_image`).
        config: a :class:`TrainConfig`; keyword ``overrides`` replace its fields.
        checkpoint: a file path. If it exists and holds a run with the same config, training resumes
            from it; after every epoch the state is saved there.
        stop_after_epoch: stop (as if interrupted) after this many epochs in total; the result has
            ``completed=False``.
        progress: show a tqdm progress bar with loss and accuracy.
        device: where to train.

    Returns:
        a :class:`TrainResult`.
    """
    if not isinstance(data, TaskData):
        raise TypeError(f"data must be a lambdaskip.tasks.TaskData, got {type(data).__name__}")
    config = TrainConfig(**{**asdict(config or TrainConfig()), **overrides})
    if stop_after_epoch is not None:
        check_positive_int(stop_after_epoch, "stop_after_epoch")
    device = torch.device(device)
    seed_everything(config.seed)
    model = build_model(
        config.arch, data, d_model=config.d_model, depth=config.depth, n_heads=config.n_heads,
        lam=config.lam, learnable_lambda=config.learnable_lambda, norm=config.norm,
        mixer_kwargs=dict(config.mixer_kwargs),
    ).to(device)
    opt = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98))
    steps_per_epoch = math.ceil(data.n_train / config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup_steps = int(round(config.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, total, warmup_steps, config.min_lr_ratio)
    )
    x_tr, y_tr = data.x_train.to(device), data.y_train.to(device)
    x_te, y_te = data.x_test.to(device), data.y_test.to(device)
    x_mu = x_te[: config.eval_batch]  # fixed batch on which μ per layer is tracked

    def record(epoch: int, step: int, train_loss: float | None, seconds: float) -> dict:
        test_loss, test_acc = evaluate(model, x_te, y_te)
        return dict(
            epoch=epoch, step=step, train_loss=train_loss, test_loss=test_loss, test_acc=test_acc,
            lambdas=model.lambdas.cpu().tolist(), mu=model.layer_mu(x_mu).cpu().tolist(), time_s=seconds,
        )

    cfg = asdict(config)
    start_epoch, step, elapsed, history, lambda_log = 0, 0, 0.0, [], []
    if checkpoint is not None and os.path.exists(checkpoint):
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if state["config"] != cfg or state["data"] != data.description:
            raise ValueError(
                f"checkpoint {os.fspath(checkpoint)!r} belongs to a different run (config or data differ); "
                "delete it or pass another path"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start_epoch, step, elapsed = state["epoch"], state["step"], state["seconds"]
        history, lambda_log = state["history"], state["lambda_log"]
    if not history:
        history.append(record(0, 0, None, 0.0))  # no training loss before the first step
        lambda_log.append((0, model.lambdas.cpu().tolist()))

    end_epoch = config.epochs if stop_after_epoch is None else min(config.epochs, stop_after_epoch)
    bar = None
    if progress and end_epoch > start_epoch:
        from tqdm.auto import tqdm

        bar = tqdm(total=(end_epoch - start_epoch) * steps_per_epoch,
                   desc=f"{config.arch} {config.setting} seed {config.seed}", leave=False)
    model.train()
    for epoch in range(start_epoch, end_epoch):
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        perm = torch.randperm(data.n_train, generator=g).to(device)
        loss_sum, loss_n = 0.0, 0
        for i in range(steps_per_epoch):
            idx = perm[i * config.batch_size : (i + 1) * config.batch_size]
            loss, _, _ = _loss_and_correct(model(x_tr[idx]), y_tr[idx])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {float(loss)} at step {step} ({config})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            sched.step()
            step += 1
            loss_sum += loss.item()
            loss_n += 1
            if step % config.log_every == 0:
                lambda_log.append((step, model.lambdas.cpu().tolist()))
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{loss_sum / loss_n:.3f}", acc=f"{history[-1]['test_acc']:.3f}")
        elapsed += time.perf_counter() - t0
        history.append(record(epoch + 1, step, loss_sum / loss_n, elapsed))
        if bar is not None:
            bar.set_postfix(loss=f"{loss_sum / loss_n:.3f}", acc=f"{history[-1]['test_acc']:.3f}")
        if checkpoint is not None:
            tmp = f"{os.fspath(checkpoint)}.tmp"
            torch.save(
                dict(config=cfg, data=data.description, model=model.state_dict(), opt=opt.state_dict(),
                     sched=sched.state_dict(), epoch=epoch + 1, step=step, seconds=elapsed,
                     history=history, lambda_log=lambda_log),
                tmp,
            )
            os.replace(tmp, checkpoint)  # atomic: an interruption never leaves a half-written checkpoint
    if bar is not None:
        bar.close()
    accs = [h["test_acc"] for h in history[1:]] or [history[0]["test_acc"]]
    return TrainResult(
        config=cfg, history=history, lambda_log=lambda_log, final_acc=history[-1]["test_acc"],
        best_acc=max(accs), seconds=elapsed, completed=end_epoch == config.epochs, model=model,
    )
