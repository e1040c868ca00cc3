"""Embodied control: PPO on brax environments (docs/design.md section 3), the policy a ``policy`` model.

One training step of a program (``config.total_steps`` counts them) is one PPO update:

1. a rollout: ``unroll_length`` steps of ``config.batch_size`` environments in parallel with the
   stochastic policy (a Gaussian around the actor's mean, clipped to the action range [-1, 1]
   when stepped), observations normalized by running statistics;
2. generalized advantage estimation (``gae``): episode ends cut the recursion; a termination
   bootstraps 0; a time-limit truncation is masked out of the loss (the auto-reset environment has
   already replaced the last observation, so no value can bootstrap it; brax's PPO does the same);
3. ``epochs`` passes over the rollout in ``num_minibatches`` shuffled minibatches, one optimizer
   update each, of the clipped objective + ``value_coef`` * 0.5 * squared error of the value -
   ``entropy_coef`` * entropy (``ppo_loss``), advantages normalized per minibatch;
4. the observation statistics absorb the rollout's observations (Chan's parallel update).

Everything is one jitted function of the train state (parameters, optimizer state, and the
experience ``carry``: the environments' state, the observation statistics, the running episode
returns); its randomness is ``fold_in(key(seed + 1), step)``, so a run is a deterministic function
of its seed, and a run resumed from a checkpoint continues exactly as the uninterrupted one.

Evaluation: the deterministic policy (the mean action) for ``eval_episodes`` episodes of at most
``episode_length`` steps from fixed initial states; ``eval_return`` is the mean undiscounted return.

Observation statistics belong to a policy as much as its weights do: the init and train programs
carry them from the templates' run or the export (``export.json``'s ``observation_stats``) when
the observation size matches, and start them anew for another morphology.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from weit_jax.tasks.base import Task

BACKENDS = ("spring", "positional", "generalized", "mjx")
EVAL_SEED = 12345  # the evaluation episodes' initial states: the same at every eval of every run
OBS_CLIP = 10.0  # normalized observations are clipped to +-OBS_CLIP (outliers early in training)


# --- environments ---------------------------------------------------------------------------------

def _brax_envs():
  """``brax.envs``, imported quietly: mujoco's MJX prints that its optional warp backend is missing
  (to stdout, at every first import), and brax warns at every environment it builds that it is not
  maintained; neither concerns the spring backend."""
  import contextlib
  import io
  import warnings
  with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from brax import envs
  return envs


def env_names() -> list[str]:
  return sorted(_brax_envs()._envs)  # brax's registry (get_environment's names)


@functools.lru_cache(maxsize=8)
def make_env(name: str, backend: str):
  """The brax environment ``name`` on ``backend`` (cached: building one parses its model, seconds)."""
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}; use one of {BACKENDS} (--config.backend; spring is the fastest on CPU).")
  import warnings
  envs = _brax_envs()
  if name not in envs._envs:
    raise ValueError(f"env={name!r} is not a brax environment; use one of {env_names()} (--config.env).")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # brax's "not actively maintained" notice, at every build
    return envs.get_environment(name, backend=backend)


@functools.lru_cache(maxsize=8)
def env_sizes(name: str, backend: str) -> tuple[int, int]:
  """(observation size, action size) of an environment."""
  env = make_env(name, backend)
  return int(env.observation_size), int(env.action_size)


# --- observation statistics -------------------------------------------------------------------------

def init_obs_stats(obs_size: int) -> dict:
  """No observations yet: normalization is the identity."""
  return {"count": jnp.zeros((), jnp.float32), "mean": jnp.zeros((obs_size,), jnp.float32),
          "m2": jnp.zeros((obs_size,), jnp.float32)}


def update_obs_stats(stats: dict, obs) -> dict:
  """``stats`` with a batch ``obs`` (N, D) merged in (Chan et al.'s parallel mean/variance update)."""
  n = jnp.asarray(obs.shape[0], jnp.float32)
  batch_mean = jnp.mean(obs, axis=0)
  batch_m2 = jnp.sum(jnp.square(obs - batch_mean), axis=0)
  total = stats["count"] + n
  delta = batch_mean - stats["mean"]
  return {"count": total, "mean": stats["mean"] + delta * n / total,
          "m2": stats["m2"] + batch_m2 + jnp.square(delta) * stats["count"] * n / total}


def normalize(stats: dict, obs):
  """``(obs - mean) / std`` by the statistics, clipped to +-OBS_CLIP; the identity before any data."""
  var = jnp.where(stats["count"] > 0, stats["m2"] / jnp.maximum(stats["count"], 1.0), 1.0)
  return jnp.clip((obs - stats["mean"]) / jnp.sqrt(var + 1e-8), -OBS_CLIP, OBS_CLIP)


def stats_to_record(stats) -> dict:
  """JSON form (``export.json``)."""
  return {k: np.asarray(v, np.float64).tolist() for k, v in jax.device_get(stats).items()}


def stats_from_record(record) -> dict:
  return {k: jnp.asarray(np.asarray(v, np.float32)) for k, v in record.items()}


# --- PPO --------------------------------------------------------------------------------------------

def gae(rewards, values, bootstrap, terminations, dones, gamma: float, lam: float):
  """Generalized advantage estimation over a time-major rollout ``(T, ...)``.

  ``delta_t = r_t + gamma (1 - term_t) v_{t+1} - v_t`` with ``v_T = bootstrap``, and
  ``A_t = delta_t + gamma lam (1 - done_t) A_{t+1}``: an episode end (``done``: termination or
  truncation) cuts the recursion, a termination also the bootstrap. Returns (advantages, value
  targets = advantages + values).
  """
  next_values = jnp.concatenate([values[1:], bootstrap[None]], axis=0)
  deltas = rewards + gamma * (1.0 - terminations) * next_values - values

  def back(next_adv, x):
    delta, done = x
    adv = delta + gamma * lam * (1.0 - done) * next_adv
    return adv, adv

  _, adv = jax.lax.scan(back, jnp.zeros_like(bootstrap), (deltas, dones), reverse=True)
  return adv, adv + values


def gaussian_log_prob(x, mean, log_std):
  """Log density of a diagonal Gaussian, summed over the last (action) axis."""
  z = (x - mean) * jnp.exp(-log_std)
  return jnp.sum(-0.5 * jnp.square(z) - log_std - 0.5 * math.log(2 * math.pi), axis=-1)


def gaussian_entropy(log_std):
  return jnp.sum(log_std + 0.5 * math.log(2 * math.pi * math.e), axis=-1)


def ppo_loss(mean, log_std, value, batch, *, clip_eps: float, value_coef: float, entropy_coef: float,
             normalize_advantage: bool = True):
  """The PPO objective on a minibatch (``obs``, ``action``, ``log_prob`` at collection, ``advantage``,
  ``return``, ``weight``: 0 on masked steps); weighted means. Returns (loss, metrics)."""
  w = batch["weight"]
  wsum = jnp.maximum(jnp.sum(w), 1.0)
  wmean = lambda x: jnp.sum(x * w) / wsum
  adv = batch["advantage"]
  if normalize_advantage:
    mu = wmean(adv)
    adv = (adv - mu) / (jnp.sqrt(wmean(jnp.square(adv - mu))) + 1e-8)
  log_ratio = gaussian_log_prob(batch["action"], mean, log_std) - batch["log_prob"]
  ratio = jnp.exp(log_ratio)
  policy_loss = -wmean(jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * adv))
  value_loss = 0.5 * wmean(jnp.square(value - batch["return"]))
  entropy = wmean(gaussian_entropy(log_std))
  loss = policy_loss + value_coef * value_loss - entropy_coef * entropy
  return loss, {"policy_loss": policy_loss, "value_loss": value_loss, "entropy": entropy,
                "approx_kl": wmean((ratio - 1) - log_ratio),
                "clip_fraction": wmean((jnp.abs(ratio - 1) > clip_eps).astype(jnp.float32))}


def distillation_loss(student, teacher, *, value_coef: float):
  """Matching a teacher policy's outputs on its own rollouts' observations: squared errors of the
  action mean and log std, and of the value relative to the teacher values' spread (returns are on
  another scale than actions). ``student``, ``teacher``: ``(mean, log_std, value)``."""
  (mean, log_std, value), (t_mean, t_log_std, t_value) = student, jax.lax.stop_gradient(teacher)
  action = jnp.mean(jnp.square(mean - t_mean)) + jnp.mean(jnp.square(log_std - t_log_std))
  value_err = jnp.mean(jnp.square(value - t_value)) / (jnp.var(t_value) + 1.0)
  return action + value_coef * value_err, {"action_error": action, "value_error": value_err}


# --- experience -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Experience:
  """A task that makes its own data: the loop calls ``init`` once (the carry goes into the train
  state), ``collect`` every step (a rollout with the current parameters), then ``epochs`` passes of
  ``num_minibatches`` updates over the batch it returns, and ``evaluate`` at eval steps."""
  init: Callable[[jax.Array], Any]  # key -> carry
  collect: Callable[..., tuple]  # (params, carry, key) -> (carry, batch of N examples, metrics)
  evaluate: Callable[[Any, Any], dict]  # (params, carry) -> metrics, jitted
  epochs: int
  num_minibatches: int
  env_steps_per_update: int
  num_envs: int  # the leading axis of the carry's per-environment entries (``PER_ENV``), split like a batch

  # The carry's entries with one row per environment (the rest, observation statistics and the last
  # return, are whole on every device).
  PER_ENV = ("env", "episode_return")

  @property
  def updates_per_step(self) -> int:
    return self.epochs * self.num_minibatches


# What an init config of the control task sets of its task (the environment may differ from the
# templates': another morphology).
SCALER_TRAINING_FIELDS = ("env", "backend", "batch_size", "episode_length", "eval_episodes", "ppo")


@dataclasses.dataclass(frozen=True)
class Control(Task):
  """PPO on a brax environment; the model is a ``policy`` (``model(obs) -> (mean, log_std, value)``)."""
  collects_experience = True
  env: str
  backend: str
  num_envs: int  # config.batch_size: environments stepped in parallel
  episode_length: int
  eval_episodes: int
  ppo: dict
  obs_stats: dict | None = None  # initial observation statistics (stats_to_record form), or None: fresh

  @classmethod
  def from_config(cls, config) -> "Control":
    return cls(str(config.env), str(config.backend), int(config.batch_size), int(config.episode_length),
               int(config.eval_episodes), config.ppo.to_dict())

  def model_fields(self) -> dict[str, int]:
    obs_size, action_size = env_sizes(self.env, self.backend)
    return dict(obs_size=obs_size, action_size=action_size)

  def prepare(self) -> None:
    """Checks the environment, backend and how the rollout splits (builds the environment once:
    seconds); the ranges of the numbers are in ``config_checks.RANGES``."""
    make_env(self.env, self.backend)
    if (self.num_envs * int(self.ppo["unroll_length"])) % int(self.ppo["num_minibatches"]):
      raise ValueError(f"a rollout of batch_size={self.num_envs} environments x unroll_length="
                       f"{self.ppo['unroll_length']} steps does not split into num_minibatches="
                       f"{self.ppo['num_minibatches']} equal minibatches; change one of them.")
    if self.obs_stats is not None and len(self.obs_stats["mean"]) != self.model_fields()["obs_size"]:
      raise ValueError(f"the observation statistics have {len(self.obs_stats['mean'])} entries, {self.env} "
                       f"observes {self.model_fields()['obs_size']}.")

  @classmethod
  def scaler_training_config(cls, config, init_config) -> None:
    """The init config's environment and PPO settings (another morphology than the templates' may be
    asked for)."""
    for name in SCALER_TRAINING_FIELDS:
      config[name] = init_config[name]

  def export_hint(self) -> str:
    return f"initialize a policy for {self.env} with configs/policy_init.py --config.env={self.env}"

  def export_record(self, carry) -> dict:
    """The observation statistics the policy was trained with (its inputs are normalized by them)."""
    if not carry or "obs_stats" not in carry:
      return {}
    return {"observation_stats": stats_to_record(carry["obs_stats"])}

  def continuing(self, record) -> "Control":
    """Starts from the record's observation statistics if this environment observes as many values."""
    stats = (record or {}).get("observation_stats")
    if stats is None or len(stats["mean"]) != self.model_fields()["obs_size"]:
      return self
    return dataclasses.replace(self, obs_stats=stats)

  def optimizer_steps(self, total_steps: int) -> int:
    """Optimizer updates in a run of ``total_steps`` PPO updates (what the LR schedule spans)."""
    return int(total_steps) * int(self.ppo["epochs"]) * int(self.ppo["num_minibatches"])

  def train_iterator(self, global_batch_size, seed, mesh):
    return None  # the experience makes the data

  def eval_iterator(self, global_batch_size):
    return []  # evaluation is the experience's (episode returns)

  def inputs(self, batch, key) -> tuple:
    del key
    return (batch["obs"],)

  def loss(self, outputs, batch, key):
    del key
    mean, log_std, value = outputs
    p = self.ppo
    return ppo_loss(mean, log_std, value, batch, clip_eps=float(p["clip_eps"]), value_coef=float(p["value_coef"]),
                    entropy_coef=float(p["entropy_coef"]), normalize_advantage=bool(p.get("normalize_advantage", True)))

  def eval_sums(self, outputs, batch):
    raise NotImplementedError("control has no eval batches; its evaluation is Experience.evaluate")

  def check_distillation(self, source_config) -> None:
    if (self.env, self.backend) != (source_config.env, source_config.backend):
      raise ValueError(f"adapt='distill' needs the auxiliary policy's environment ({source_config.env}, "
                       f"{source_config.backend}): its actions mean nothing in {self.env}. Use --config.adapt=ppo.")

  def distillation(self, forward: Callable[..., Any], teacher: Callable[..., Any]):
    """The teacher policy acts in the rollouts; the loss matches its outputs (``distillation_loss``)."""
    def loss_fn(params, batch, key):  # the teacher's outputs come with the batch (its rollout)
      del key
      return distillation_loss(forward(params, batch["obs"]), (batch["mean"], batch["log_std"], batch["value"]),
                               value_coef=float(self.ppo["value_coef"]))
    return loss_fn, self.experience(forward, actor=teacher)

  def experience(self, forward: Callable[..., Any], *, actor: Callable[..., Any] | None = None) -> Experience:
    """``forward(params, obs) -> (mean, log_std, value)``: the policy trained. ``actor``: another
    policy that acts in the rollouts instead (distillation); None: the trained one."""
    return make_experience(self, forward, actor)


def _raw_keys(key, n: int):
  """``n`` keys as brax's wrappers take them: raw uint32 (n, 2) (they read the batch from shape[:-1])."""
  return jax.random.key_data(jax.random.split(key, n))


def make_experience(task: Control, forward, actor=None) -> Experience:
  wrappers = _brax_envs().training
  env = make_env(task.env, task.backend)
  obs_size, _ = env_sizes(task.env, task.backend)
  p = task.ppo
  T, E = int(p["unroll_length"]), int(task.num_envs)
  gamma, lam, reward_scaling = float(p["discounting"]), float(p["gae_lambda"]), float(p["reward_scaling"])
  train_env = wrappers.wrap(env, episode_length=task.episode_length)
  eval_env = wrappers.EpisodeWrapper(wrappers.VmapWrapper(env), task.episode_length, 1)
  act = actor or forward

  def init(key):
    stats = stats_from_record(task.obs_stats) if task.obs_stats is not None else init_obs_stats(obs_size)
    return {"env": train_env.reset(_raw_keys(key, E)), "obs_stats": stats,
            "episode_return": jnp.zeros((E,), jnp.float32), "last_return": jnp.zeros((), jnp.float32)}

  def collect(params, carry, key):
    stats = carry["obs_stats"]

    def step(c, k):
      state, ep_return = c
      obs = normalize(stats, state.obs)
      mean, log_std, value = act(params, obs)
      action = mean + jnp.exp(log_std) * jax.random.normal(k, mean.shape)
      nxt = train_env.step(state, jnp.clip(action, -1.0, 1.0))
      truncation = nxt.info["truncation"]
      ep_return = ep_return + nxt.reward
      record = dict(obs=obs, raw_obs=state.obs, action=action, log_prob=gaussian_log_prob(action, mean, log_std),
                    mean=mean, log_std=log_std, value=value, reward=nxt.reward * reward_scaling, done=nxt.done,
                    termination=nxt.done * (1 - truncation), truncation=truncation, finished=ep_return * nxt.done)
      return (nxt, ep_return * (1 - nxt.done)), record

    (state, ep_return), traj = jax.lax.scan(step, (carry["env"], carry["episode_return"]), jax.random.split(key, T))
    if actor is not None:  # distillation: the targets are the actor's outputs (computed once, here)
      batch = {k: traj[k] for k in ("obs", "mean", "log_std", "value")}
    else:
      bootstrap = forward(params, normalize(stats, state.obs))[2]
      advantage, returns = gae(traj["reward"], traj["value"], bootstrap, traj["termination"], traj["done"], gamma, lam)
      batch = {"obs": traj["obs"], "action": traj["action"], "log_prob": traj["log_prob"], "advantage": advantage,
               "return": returns, "weight": 1.0 - traj["truncation"]}
    batch = jax.tree_util.tree_map(lambda x: x.reshape((T * E,) + x.shape[2:]), batch)
    episodes = jnp.sum(traj["done"])
    last_return = jnp.where(episodes > 0, jnp.sum(traj["finished"]) / jnp.maximum(episodes, 1.0),
                            carry["last_return"])
    # brax's wrappers return some leaves weakly typed where reset's are not: made strong, so that the
    # step's output carry has its input's types (no second compile, and a restored state the same).
    state = jax.tree_util.tree_map(lambda x: jnp.array(x, dtype=x.dtype), state)
    carry = {"env": state, "obs_stats": update_obs_stats(stats, traj["raw_obs"].reshape(T * E, -1)),
             "episode_return": ep_return, "last_return": last_return}
    return carry, batch, {"episode_return": last_return, "episodes": episodes}

  @jax.jit
  def evaluate(params, carry):
    """The deterministic policy's (the mean action's) returns over the fixed episodes, and as
    ``sampled_return`` the returns of the policy PPO trains (actions sampled, a fixed key) over the
    same initial states: unlike the training return, it needs no episode to end during training
    (an episode of L steps ends L / unroll_length updates after it starts)."""
    stats = carry["obs_stats"]
    start = eval_env.reset(_raw_keys(jax.random.key(EVAL_SEED), int(task.eval_episodes)))
    zeros = jnp.zeros((int(task.eval_episodes),), jnp.float32)

    def returns(sample_key):
      def step(c, k):
        state, ret, ended = c
        mean, log_std, _ = forward(params, normalize(stats, state.obs))
        action = mean if k is None else mean + jnp.exp(log_std) * jax.random.normal(k, mean.shape)
        state = eval_env.step(state, jnp.clip(action, -1.0, 1.0))
        return (state, ret + state.reward * (1 - ended), jnp.maximum(ended, state.done)), None

      keys = None if sample_key is None else jax.random.split(sample_key, int(task.episode_length))
      (_, ret, _), _ = jax.lax.scan(step, (start, zeros, zeros), keys, length=task.episode_length)
      return ret

    ret, sampled = returns(None), returns(jax.random.key(EVAL_SEED + 1))
    return {"return": jnp.mean(ret), "return_std": jnp.std(ret), "sampled_return": jnp.mean(sampled)}

  return Experience(init=init, collect=collect, evaluate=evaluate, epochs=int(p["epochs"]),
                    num_minibatches=int(p["num_minibatches"]), env_steps_per_update=T * E, num_envs=E)


__all__ = ["BACKENDS", "Control", "Experience", "env_names", "env_sizes", "gae", "gaussian_entropy",
           "gaussian_log_prob", "make_env", "normalize", "ppo_loss", "update_obs_stats"]
