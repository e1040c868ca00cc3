"""Control (PPO on brax) in-process: GAE, the PPO objective, the Gaussian policy's densities and the
observation statistics against hand-computed values and numpy/scipy reimplementations; the policy
family composed from templates against an explicit ``numpy.kron`` oracle and a numpy forward pass
(one template bank for hopper and walker2d sizes); and the ``Control`` task's rollouts and evaluation
on a tiny inverted pendulum (one module-scoped fixture: a brax environment's compile costs seconds;
the pendulum is the cheapest system to compile, about half of hopper's)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util
from scipy import stats as scipy_stats

from configs import policy_train
from weit_jax import generator, models, tasks
from weit_jax.tasks import control


# --- GAE ------------------------------------------------------------------------------------------

def loop_gae(rewards, values, bootstrap, terms, dones, gamma, lam):
  """Generalized advantage estimation as a plain double loop (time backwards, per environment)."""
  T, E = rewards.shape
  adv = np.zeros((T, E))
  for e in range(E):
    nxt = 0.0
    for t in reversed(range(T)):
      v_next = bootstrap[e] if t == T - 1 else values[t + 1, e]
      delta = rewards[t, e] + gamma * (1.0 - terms[t, e]) * v_next - values[t, e]
      nxt = delta + gamma * lam * (1.0 - dones[t, e]) * nxt
      adv[t, e] = nxt
  return adv


def test_gae_by_hand():
  """T=2, gamma=lam=0.5, rewards (1, 2), values (0.5, 1), bootstrap 4; three environments:
  no episode end; a termination at t=0; a truncation at t=0 (done but not terminated).

    t=1 (all columns): delta_1 = 2 + 0.5*4 - 1 = 3                       A_1 = 3
    col 0: delta_0 = 1 + 0.5*1 - 0.5 = 1,   A_0 = 1 + 0.25*3 = 1.75
    col 1: delta_0 = 1 + 0 - 0.5 = 0.5,     A_0 = 0.5   (no bootstrap, recursion cut)
    col 2: delta_0 = 1 + 0.5*1 - 0.5 = 1,   A_0 = 1     (bootstrap kept, recursion cut)
  returns = A + values: col 0 (2.25, 4), col 1 (1.0, 4), col 2 (1.5, 4).
  """
  rewards = jnp.array([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
  values = jnp.array([[0.5, 0.5, 0.5], [1.0, 1.0, 1.0]])
  bootstrap = jnp.array([4.0, 4.0, 4.0])
  terms = jnp.array([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
  dones = jnp.array([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
  adv, ret = control.gae(rewards, values, bootstrap, terms, dones, 0.5, 0.5)
  np.testing.assert_allclose(np.asarray(adv), [[1.75, 0.5, 1.0], [3.0, 3.0, 3.0]], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(ret), [[2.25, 1.0, 1.5], [4.0, 4.0, 4.0]], rtol=1e-6)


def test_gae_matches_a_loop_with_termination_and_truncation():
  rng = np.random.default_rng(0)
  T, E, gamma, lam = 4, 2, 0.9, 0.8
  rewards = rng.normal(size=(T, E))
  values = rng.normal(size=(T, E))
  bootstrap = rng.normal(size=(E,))
  terms = np.zeros((T, E))
  dones = np.zeros((T, E))
  terms[1, 0] = dones[1, 0] = 1.0  # env 0 terminates at t=1
  dones[2, 1] = 1.0  # env 1 is truncated at t=2 (time limit: done, not terminated)
  adv, ret = control.gae(*(jnp.asarray(x, jnp.float32) for x in (rewards, values, bootstrap, terms, dones)),
                         gamma, lam)
  want = loop_gae(rewards, values, bootstrap, terms, dones, gamma, lam)
  np.testing.assert_allclose(np.asarray(adv), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ret), want + values, rtol=1e-5, atol=1e-6)
  # The episode ends matter: the same rollout without them gives other advantages before them.
  free = loop_gae(rewards, values, bootstrap, np.zeros((T, E)), np.zeros((T, E)), gamma, lam)
  assert not np.allclose(free[:2, 0], want[:2, 0]) and not np.allclose(free[:3, 1], want[:3, 1])
  np.testing.assert_allclose(free[3], want[3])  # the last step has nothing after it to cut


# --- Gaussian policy ---------------------------------------------------------------------------------

def test_gaussian_log_prob_and_entropy_match_scipy():
  rng = np.random.default_rng(1)
  x, mean = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
  log_std = rng.normal(scale=0.5, size=(5, 3))
  got = control.gaussian_log_prob(jnp.asarray(x, jnp.float32), jnp.asarray(mean, jnp.float32),
                                  jnp.asarray(log_std, jnp.float32))
  want = scipy_stats.norm.logpdf(x, loc=mean, scale=np.exp(log_std)).sum(-1)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  ent = control.gaussian_entropy(jnp.asarray(log_std, jnp.float32))
  np.testing.assert_allclose(np.asarray(ent), scipy_stats.norm.entropy(scale=np.exp(log_std)).sum(-1), rtol=1e-5,
                             atol=1e-5)
  # The closed form, by hand: one unit Gaussian has entropy 0.5 * log(2 pi e) = 1.4189385...
  np.testing.assert_allclose(float(control.gaussian_entropy(jnp.zeros((1,)))), 1.4189385332, rtol=1e-6)


# --- PPO loss -----------------------------------------------------------------------------------------

def numpy_ppo(mean, log_std, value, b, clip_eps, value_coef, entropy_coef, normalize_advantage):
  """The clipped PPO objective in float64, weighted means over ``weight``."""
  w = b["weight"]
  wm = lambda x: np.sum(x * w) / max(np.sum(w), 1.0)
  adv = b["advantage"]
  if normalize_advantage:
    mu = wm(adv)
    adv = (adv - mu) / (np.sqrt(wm((adv - mu) ** 2)) + 1e-8)
  std = np.exp(log_std)
  logp = np.sum(-0.5 * ((b["action"] - mean) / std) ** 2 - log_std - 0.5 * np.log(2 * np.pi), axis=-1)
  log_ratio = logp - b["log_prob"]
  ratio = np.exp(log_ratio)
  pl = -wm(np.minimum(ratio * adv, np.clip(ratio, 1 - clip_eps, 1 + clip_eps) * adv))
  vl = 0.5 * wm((value - b["return"]) ** 2)
  ent = wm(np.sum(log_std + 0.5 * np.log(2 * np.pi * np.e), axis=-1))
  return dict(loss=pl + value_coef * vl - entropy_coef * ent, policy_loss=pl, value_loss=vl, entropy=ent,
              approx_kl=wm(ratio - 1 - log_ratio), clip_fraction=wm((np.abs(ratio - 1) > clip_eps).astype(float)))


@pytest.mark.parametrize("normalize_advantage", [True, False])
def test_ppo_loss_matches_numpy(normalize_advantage):
  rng = np.random.default_rng(2)
  N, A = 32, 3
  mean = rng.normal(size=(N, A))
  log_std = np.broadcast_to(rng.normal(scale=0.3, size=(A,)), (N, A))
  value = rng.normal(size=(N,))
  action = mean + rng.normal(scale=0.7, size=(N, A))
  # log-probs at collection: the current policy's, moved by up to +-0.5 so ratios straddle the clip.
  logp_now = np.sum(scipy_stats.norm.logpdf(action, mean, np.exp(log_std)), -1)
  weight = (rng.uniform(size=N) > 0.25).astype(float)
  weight[:3] = [0.0, 1.0, 0.0]  # some masked (truncated) steps for sure
  batch = dict(action=action, log_prob=logp_now + rng.uniform(-0.5, 0.5, size=N), advantage=rng.normal(2.0, 3.0, size=N),
               weight=weight, **{"return": rng.normal(size=N)})
  kw = dict(clip_eps=0.2, value_coef=0.7, entropy_coef=0.03)
  loss, aux = jax.jit(lambda *a: control.ppo_loss(*a, **kw, normalize_advantage=normalize_advantage))(
      *(jnp.asarray(x, jnp.float32) for x in (mean, log_std, value)),
      {k: jnp.asarray(v, jnp.float32) for k, v in batch.items()})
  want = numpy_ppo(mean, log_std, value, batch, **kw, normalize_advantage=normalize_advantage)
  got = dict(jax.device_get(aux), loss=float(loss))
  for k, v in want.items():
    np.testing.assert_allclose(float(got[k]), v, rtol=2e-5, atol=2e-6, err_msg=k)
  assert 0.0 < want["clip_fraction"] < 1.0  # the clipped and unclipped branches both occur
  # Masked steps do not count: changing them changes nothing.
  masked = dict(batch, advantage=np.where(weight == 0, 1e3, batch["advantage"]),
                **{"return": np.where(weight == 0, -1e3, batch["return"])})
  loss2, _ = control.ppo_loss(*(jnp.asarray(x, jnp.float32) for x in (mean, log_std, value)),
                              {k: jnp.asarray(v, jnp.float32) for k, v in masked.items()}, **kw,
                              normalize_advantage=normalize_advantage)
  np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-5)


def test_distillation_loss_matches_numpy_and_leaves_the_teacher_alone():
  rng = np.random.default_rng(6)
  N, A = 16, 3
  student = [rng.normal(size=(N, A)), np.broadcast_to(rng.normal(size=A), (N, A)), rng.normal(size=N)]
  teacher = [rng.normal(size=(N, A)), np.broadcast_to(rng.normal(size=A), (N, A)), 5.0 * rng.normal(size=N)]
  as32 = lambda xs: tuple(jnp.asarray(x, jnp.float32) for x in xs)
  loss, aux = control.distillation_loss(as32(student), as32(teacher), value_coef=0.4)
  action = np.mean((student[0] - teacher[0]) ** 2) + np.mean((student[1] - teacher[1]) ** 2)
  value = np.mean((student[2] - teacher[2]) ** 2) / (np.var(teacher[2]) + 1.0)
  np.testing.assert_allclose([float(loss), float(aux["action_error"]), float(aux["value_error"])],
                             [action + 0.4 * value, action, value], rtol=1e-5)
  grads = jax.grad(lambda t: control.distillation_loss(as32(student), t, value_coef=0.4)[0])(as32(teacher))
  assert all(not np.any(np.asarray(g)) for g in grads)  # the teacher is a constant


# --- observation statistics ------------------------------------------------------------------------

def test_obs_stats_over_batches_equal_numpy_mean_and_var():
  rng = np.random.default_rng(3)
  batches = [rng.normal(loc=rng.normal(size=5) * 3, scale=rng.uniform(0.5, 4, size=5), size=(n, 5))
             for n in (7, 1, 30, 12)]
  stats = control.init_obs_stats(5)
  update = jax.jit(control.update_obs_stats)
  for b in batches:
    stats = update(stats, jnp.asarray(b, jnp.float32))
  every = np.concatenate(batches)
  assert float(stats["count"]) == len(every)
  np.testing.assert_allclose(np.asarray(stats["mean"]), every.mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(stats["m2"]) / float(stats["count"]), every.var(0), rtol=1e-4)

  # normalize: after data, (x - mean) / sqrt(var + 1e-8), clipped at +-10 (outliers included).
  x = rng.normal(size=(6, 5)) * 4
  x[0, 0], x[1, 1] = 1e3, -1e3
  want = np.clip((x - every.mean(0)) / np.sqrt(every.var(0) + 1e-8), -10, 10)
  got = np.asarray(control.normalize(stats, jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert got[0, 0] == 10.0 and got[1, 1] == -10.0
  # Before any data: the identity (up to sqrt(1 + 1e-8)), clipped.
  fresh = np.asarray(control.normalize(control.init_obs_stats(5), jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(fresh, np.clip(x, -10, 10), rtol=1e-6)


# --- the policy from templates ---------------------------------------------------------------------

TILES = dict(hidden=8, hidden_in=8, obs=1, action=1)


def policy_generator(obs_size, action_size, width=20, depth=3, n=3):
  cfg = models.from_config(dict(family="policy", width=width, depth=depth), dict(obs_size=obs_size,
                                                                                 action_size=action_size))
  model = models.build(cfg)
  return cfg, model, generator.WeightGenerator.from_model(model, *models.dummy_inputs(cfg), tiles=TILES,
                                                          num_templates=n)


def expected_shapes(cfg):
  """Every parameter of the actor-critic, written from the architecture (not from the generator)."""
  w, o, a, layers = cfg.width, cfg.obs_size, cfg.action_size, cfg.depth - 1
  out = {"log_std": (a,)}
  for tower, out_size in (("actor", a), ("critic", 1)):
    out.update({f"{tower}/input/kernel": (o, w), f"{tower}/input/bias": (w,),
                f"{tower}/hidden/dense/kernel": (layers, w, w), f"{tower}/hidden/dense/bias": (layers, w),
                f"{tower}/head/kernel": (w, out_size), f"{tower}/head/bias": (out_size,)})
  return out


def kron_oracle(t, s, shape, layered):
  """crop(sum_t kron(S[l, t], T[t])) with explicit numpy.kron calls, per layer."""
  def one(sl):
    full = np.zeros(tuple(g * w for g, w in zip(sl.shape[1:], t.shape[1:])))
    for i in range(t.shape[0]):
      full = full + np.kron(sl[i], t[i])
    return full[tuple(slice(0, n) for n in shape)]
  if layered:
    return np.stack([one(s[l]) for l in range(s.shape[0])])
  return one(s)


def random_tree(shapes, rng):
  return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), shapes)


def numpy_policy(p, obs, depth):
  """The actor-critic in float64: two tanh towers (input layer, depth-1 hidden layers, linear head)."""
  def tower(name):
    h = np.tanh(obs @ p[f"{name}/input/kernel"] + p[f"{name}/input/bias"])
    for l in range(depth - 1):
      h = np.tanh(h @ p[f"{name}/hidden/dense/kernel"][l] + p[f"{name}/hidden/dense/bias"][l])
    return h @ p[f"{name}/head/kernel"] + p[f"{name}/head/bias"]
  mean = tower("actor")
  return mean, np.broadcast_to(p["log_std"], mean.shape), tower("critic")[:, 0]


def check_against_oracle(cfg, templates, scalers, params):
  flat_t, flat_s = (traverse_util.flatten_dict(jax.device_get(x), sep="/") for x in (templates, scalers))
  flat_p = traverse_util.flatten_dict(jax.device_get(params), sep="/")
  shapes = expected_shapes(cfg)
  assert {k: tuple(v.shape) for k, v in flat_p.items()} == shapes
  for path, shape in shapes.items():
    layered = "/hidden/" in path
    want = kron_oracle(np.asarray(flat_t[path], np.float64), np.asarray(flat_s[path], np.float64),
                       shape[1:] if layered else shape, layered)
    np.testing.assert_allclose(flat_p[path], want, rtol=1e-5, atol=1e-5, err_msg=path)
  return {k: np.asarray(v, np.float64) for k, v in flat_p.items()}


def test_policy_from_templates_equals_the_kron_oracle_and_a_numpy_forward():
  cfg, model, gen = policy_generator(11, 3)
  # Tile shapes: observation and action axes in tiles of 1, the width (20: not a multiple of 8) in 8s.
  banks = {"/".join(p): b for p, b in gen.banks.items()}
  assert banks["actor/input/kernel"].tile == (1, 8) and banks["actor/input/kernel"].grid == (11, 3)
  assert banks["actor/head/kernel"].tile == (8, 1) and banks["actor/head/kernel"].grid == (3, 3)
  assert banks["actor/hidden/dense/kernel"].scaler_shape == (2, 3, 3, 3)
  assert banks["log_std"].tile == (1,) and banks["critic/head/kernel"].tile == (8, 1)  # 'value' is format
  rng = np.random.default_rng(4)
  templates, scalers = random_tree(gen.template_shapes(), rng), random_tree(gen.scaler_shapes(), rng)
  params = jax.jit(gen.materialize)(templates, scalers)
  p = check_against_oracle(cfg, templates, scalers, params)

  # The plain model on the materialized parameters is the numpy actor-critic.
  obs = rng.normal(size=(6, 11))
  mean, log_std, value = jax.jit(model.apply)({"params": params}, jnp.asarray(obs, jnp.float32))
  assert mean.shape == (6, 3) and log_std.shape == (6, 3) and value.shape == (6,)
  want_mean, want_log_std, want_value = numpy_policy(p, obs, cfg.depth)
  # Random N(0,1) templates and scalers make pre-activations of ~10; tanh saturates, heads of ~10.
  np.testing.assert_allclose(np.asarray(mean), want_mean, rtol=1e-4, atol=1e-4 * np.abs(want_mean).max())
  np.testing.assert_allclose(np.asarray(log_std), want_log_std, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(value), want_value, rtol=1e-4, atol=1e-4 * np.abs(want_value).max())

  # The same templates serve walker2d's sizes (17 observations, 6 actions), and a deeper, wider tower.
  for obs_size, action_size, width, depth in ((17, 6, 20, 3), (17, 6, 36, 5)):
    wcfg, wmodel, wgen = policy_generator(obs_size, action_size, width=width, depth=depth)
    wgen.check_templates(templates)  # passes: every bank has the same tile shape
    assert jax.tree_util.tree_map(lambda s: s.shape, wgen.template_shapes()) == \
        jax.tree_util.tree_map(lambda s: s.shape, gen.template_shapes())
    wscalers = random_tree(wgen.scaler_shapes(), rng)
    wparams = jax.jit(wgen.materialize)(templates, wscalers)
    check_against_oracle(wcfg, templates, wscalers, wparams)
    out = jax.jit(wmodel.apply)({"params": wparams}, jnp.ones((2, obs_size)))
    assert [tuple(o.shape) for o in out] == [(2, action_size), (2, action_size), (2,)]


# --- the Control task end to end --------------------------------------------------------------------

TINY = dict(batch_size=8, episode_length=20, eval_episodes=2)
TINY_PPO = dict(unroll_length=4, num_minibatches=2, epochs=1)


@pytest.fixture(scope="module")
def pendulum():
  """A tiny inverted pendulum (spring) task, a mu policy, its experience with jitted init / collect."""
  config = ml_collections.ConfigDict(policy_train.get_config("runlocal").to_dict())
  config.update(TINY, env="inverted_pendulum")
  config.ppo.update(TINY_PPO)
  config.model.variant = "mu"
  task = tasks.from_config(config)
  assert isinstance(task, tasks.Control) and (task.env, task.backend) == ("inverted_pendulum", "spring")
  task.prepare()
  cfg = models.from_config(config.model, task.model_fields())
  model = models.build(cfg)
  rng = np.random.default_rng(5)
  # Random parameters (the model's own init has a near-zero action head): the rollouts move.
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(scale=0.3, size=x.shape), jnp.float32),
                                  models.init_params(cfg, 0))
  forward = lambda p, obs: model.apply({"params": p}, obs)
  exp = task.experience(forward)
  carry = jax.jit(exp.init)(jax.random.key(0))
  return dict(task=task, cfg=cfg, params=params, forward=jax.jit(forward), exp=exp, carry=carry,
              collect=jax.jit(exp.collect))


def test_control_model_fields_and_rollout_batch(pendulum):
  cfg, exp, params = pendulum["cfg"], pendulum["exp"], pendulum["params"]
  assert (cfg.obs_size, cfg.action_size, cfg.width, cfg.depth) == (4, 1, 32, 2)
  assert pendulum["task"].optimizer_steps(10) == 10 * 1 * 2
  T, E = TINY_PPO["unroll_length"], TINY["batch_size"]
  assert exp.env_steps_per_update == T * E and exp.updates_per_step == 2
  carry, batch, metrics = pendulum["collect"](params, pendulum["carry"], jax.random.key(1))
  batch = jax.device_get(batch)
  assert {k: v.shape for k, v in batch.items()} == {
      "obs": (T * E, 4), "action": (T * E, 1), "log_prob": (T * E,), "advantage": (T * E,), "return": (T * E,),
      "weight": (T * E,)}
  assert set(np.unique(batch["weight"])) <= {0.0, 1.0}
  # The log-probabilities at collection are the policy's own on the recorded observations and actions.
  mean, log_std, value = (np.asarray(x, np.float64) for x in pendulum["forward"](params, batch["obs"]))
  np.testing.assert_allclose(batch["log_prob"],
                             scipy_stats.norm.logpdf(batch["action"], mean, np.exp(log_std)).sum(-1), rtol=1e-4,
                             atol=1e-4)
  # Value targets are advantages plus the critic's values of the same observations.
  np.testing.assert_allclose(batch["return"] - batch["advantage"], value, rtol=1e-4, atol=1e-4)
  # The first rollout is normalized by empty statistics (the identity); the carry then holds the
  # statistics of exactly these T*E observations.
  assert np.abs(batch["obs"]).max() < 10.0
  stats = jax.device_get(carry["obs_stats"])
  assert float(stats["count"]) == T * E
  np.testing.assert_allclose(stats["mean"], batch["obs"].mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats["m2"] / T / E, batch["obs"].var(0), rtol=1e-3, atol=1e-6)
  assert float(metrics["episodes"]) >= 0


def test_control_rollouts_and_evaluation_are_deterministic(pendulum):
  exp, params, collect = pendulum["exp"], pendulum["params"], pendulum["collect"]
  first = jax.device_get(collect(params, pendulum["carry"], jax.random.key(2)))
  again = jax.device_get(collect(params, pendulum["carry"], jax.random.key(2)))
  jax.tree_util.tree_map(np.testing.assert_array_equal, first, again)
  other = jax.device_get(collect(params, pendulum["carry"], jax.random.key(3)))
  assert not np.array_equal(first[1]["action"], other[1]["action"])  # the key does matter

  # 20 environment steps (5 rollouts of 4): every environment's episode ends at least once (the
  # time limit is 20), and the weights mask only the truncated steps.
  carry, episodes, weights = pendulum["carry"], 0.0, []
  for i in range(5):
    carry, batch, m = collect(params, carry, jax.random.key(10 + i))
    episodes += float(m["episodes"])
    weights.append(np.asarray(batch["weight"]))
  assert episodes >= TINY["batch_size"]
  assert set(np.unique(np.concatenate(weights))) <= {0.0, 1.0}
  assert float(jax.device_get(carry["obs_stats"]["count"])) == 5 * 32
  # Deterministic evaluation (the mean action from fixed initial states): the same return twice.
  ev1, ev2 = jax.device_get(exp.evaluate(params, carry)), jax.device_get(exp.evaluate(params, carry))
  assert ev1 == ev2 and np.isfinite(ev1["return"]) and ev1["return"] != 0.0
  # The sampled policy's return: another number than the mean action's, and the mean action's in
  # the limit of no action noise (log_std -> -inf).
  assert np.isfinite(ev1["sampled_return"]) and ev1["sampled_return"] != ev1["return"]
  quiet = dict(params, log_std=jnp.full_like(params["log_std"], -40.0))
  ev_quiet = jax.device_get(exp.evaluate(quiet, carry))
  np.testing.assert_allclose(ev_quiet["sampled_return"], ev_quiet["return"], rtol=1e-5)


def test_a_rollout_returns_the_carry_with_the_types_it_took(pendulum):
  """The carry out of ``collect`` must have the avals of the carry in (shape, dtype and weak type):
  otherwise every jitted caller (the train step) is compiled once more after its first call."""
  exp, params = pendulum["exp"], pendulum["params"]
  given = jax.eval_shape(exp.init, jax.random.key(0))
  returned = jax.eval_shape(exp.collect, params, given, jax.random.key(1))[0]
  aval = lambda x: (x.shape, x.dtype, x.weak_type)
  differ = [jax.tree_util.keystr(k) for (k, a), b in zip(jax.tree_util.tree_flatten_with_path(given)[0],
                                                         jax.tree_util.tree_leaves(returned)) if aval(a) != aval(b)]
  assert not differ, differ
