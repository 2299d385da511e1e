"""Training with optax: supervised fine-tuning and DPO, for building pools.

Batches are dicts of fixed-shape int arrays:
  sft: tokens [B, L], mask [B, L] (1 on tokens that carry loss)
  dpo: chosen, chosen_mask, rejected, rejected_mask [B, L]
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

from recycle_jax.models import transformer

PyTree = Any


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 200
  batch_size: int = 32
  learning_rate: float = 3e-3
  warmup_steps: int = 20
  weight_decay: float = 0.0
  objective: str = "sft"  # 'sft' or 'dpo'
  dpo_beta: float = 0.1
  dpo_sft_weight: float = 0.0  # adds the chosen answers' NLL (RPO-style) when > 0


def sequence_logprob(apply, params, tokens, mask) -> jax.Array:
  """[B] summed log-probability of the masked tokens."""
  return jnp.sum(transformer.token_logprobs(apply(params, tokens), tokens) * mask, -1)


def sft_loss(apply, params, batch, ref_params=None, cfg: TrainConfig = None) -> jax.Array:
  lp = transformer.token_logprobs(apply(params, batch["tokens"]), batch["tokens"])
  return -jnp.sum(lp * batch["mask"]) / jnp.maximum(jnp.sum(batch["mask"]), 1)


def dpo_loss(apply, params, batch, ref_params, cfg: TrainConfig) -> jax.Array:
  """Direct preference optimization against a frozen reference (Rafailov et al. 2023)."""
  def margins(p):
    c = sequence_logprob(apply, p, batch["chosen"], batch["chosen_mask"])
    r = sequence_logprob(apply, p, batch["rejected"], batch["rejected_mask"])
    return c, r
  c, r = margins(params)
  rc, rr = jax.lax.stop_gradient(margins(ref_params))
  loss = -jnp.mean(jax.nn.log_sigmoid(cfg.dpo_beta * ((c - rc) - (r - rr))))
  if cfg.dpo_sft_weight > 0:
    n = jnp.maximum(jnp.sum(batch["chosen_mask"]), 1)
    loss += cfg.dpo_sft_weight * -jnp.sum(c) / n
  return loss


LOSSES: dict[str, Callable] = {"sft": sft_loss, "dpo": dpo_loss}


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, min(cfg.warmup_steps, max(cfg.steps - 1, 1)),
      max(cfg.steps, 2), end_value=cfg.learning_rate * 0.1)


def make_optimizer(weight_decay: float) -> optax.GradientTransformation:
  """AdamW whose learning rate is an input, so one compiled step serves every schedule."""
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.inject_hyperparams(optax.adamw)(
                         learning_rate=0.0, b2=0.98, weight_decay=weight_decay))


def _static(cfg: TrainConfig) -> TrainConfig:
  """The fields the compiled step depends on; steps/lr/warmup only shape the schedule."""
  return dataclasses.replace(cfg, steps=0, learning_rate=0.0, warmup_steps=0, batch_size=0)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def _step(apply, cfg: TrainConfig, params, opt_state, batch, ref_params, lr):
  """One optimizer step; compiled once per (apply, objective) and reused across recipes."""
  loss, grads = jax.value_and_grad(
      lambda p: LOSSES[cfg.objective](apply, p, batch, ref_params, cfg))(params)
  opt_state[1].hyperparams["learning_rate"] = lr
  updates, opt_state = make_optimizer(cfg.weight_decay).update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def train(apply, params: PyTree, batches: Iterator[dict], cfg: TrainConfig,
          ref_params: PyTree | None = None, desc: str = "train") -> tuple[PyTree, float]:
  """Runs cfg.steps optimizer steps; returns the new params and the last loss.

  `apply` must be hashable and stable (e.g. `transformer.Decoder(cfg).apply`) so the step
  compiles once for every recipe that shares a TrainConfig.
  """
  opt_state = make_optimizer(cfg.weight_decay).init(params)
  sched, static = lr_schedule(cfg), _static(cfg)
  loss = float("nan")
  bar = tqdm(range(cfg.steps), desc=desc, leave=False, mininterval=2.0)
  for i in bar:
    params, opt_state, loss = _step(apply, static, params, opt_state, next(batches),
                                    ref_params, jnp.float32(sched(i)))
    if i % 50 == 0 or i == cfg.steps - 1:
      bar.set_postfix(loss=f"{float(loss):.3f}")
  return params, float(loss)


def init_opt_state(params: PyTree, cfg: TrainConfig) -> PyTree:
  """The optimizer state `train_step` expects for params."""
  return make_optimizer(cfg.weight_decay).init(params)


def train_step(apply, cfg: TrainConfig, params: PyTree, opt_state: PyTree, batch: dict,
               lr: float, ref_params: PyTree | None = None) -> tuple[PyTree, PyTree, float]:
  """One optimizer step at learning rate `lr` (the caller's schedule): (params, opt_state,
  loss). opt_state is donated: keep a copy to branch a run from it."""
  params, opt_state, loss = _step(apply, _static(cfg), params, opt_state, batch, ref_params,
                                  jnp.float32(lr))
  return params, opt_state, float(loss)
