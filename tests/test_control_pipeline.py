"""The three programs for control, in one process on tiny settings: policy templates pre-trained by
PPO on inverted_pendulum (4 observations, 1 action); a target initialized from them for it by
distillation, and one for inverted_double_pendulum (another morphology: 8 observations) by PPO;
a policy trained from that export. (The pendulums compile in about half of hopper's time; the
hopper and walker2d runs are the benchmark's and the README's.)
What is checked is the plumbing that makes transfer honest: target sizes from the environment,
observation statistics carried from the templates' run only where they fit, exports usable by the
train program, and the refusals around them."""
import jax
import ml_collections
import numpy as np
import pytest

TINY = dict(env="inverted_pendulum", batch_size=8, episode_length=20, eval_episodes=2, log_every=1)
TINY_PPO = dict(unroll_length=4, num_minibatches=2, epochs=1)


def _config(module, **overrides):
  c = ml_collections.ConfigDict(module.get_config("runlocal").to_dict())
  c.update(dict(TINY, **overrides))
  c.ppo.update(TINY_PPO)
  if "model" in c:
    c.model.variant, c.model.width, c.model.depth = None, 16, 2
  return c


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  from configs import policy_pretrain
  from weit_jax.programs import pretrain
  workdir = str(tmp_path_factory.mktemp("policy") / "pre")
  c = _config(policy_pretrain, total_steps=3, eval_every=0, checkpoint_every=3)
  c.weit.tiles = dict(hidden=8, hidden_in=8, obs=1, action=1)
  c.weit.num_templates = 2
  summary = pretrain.run(c, workdir)
  return workdir, summary


def test_pretrain_records_returns_and_observation_statistics(pretrained):
  from weit_jax import metrics
  from weit_jax.programs import pretrain
  workdir, summary = pretrained
  records = metrics.read_metrics(workdir)
  steps = [r for r in records if "episode_return" in r]
  assert [r["step"] for r in steps] == [1, 2, 3]
  assert [r["env_steps"] for r in steps] == [32.0, 64.0, 96.0]  # 8 environments x unroll 4 per update
  assert np.isfinite(summary["eval_return"])
  _, _, state, step = pretrain.restore_state(workdir)
  stats = state["carry"]["obs_stats"]
  assert step == 3 and float(stats["count"]) == 3 * 32  # every observation of every rollout, once
  assert stats["mean"].shape == (4,)


def test_init_for_both_morphologies_and_train_from_an_export(pretrained, tmp_path):
  from configs import policy_init, policy_train
  from weit_jax import checkpoint, models, tasks
  from weit_jax.programs import init as init_program
  from weit_jax.programs import pretrain, train
  workdir, _ = pretrained
  _, _, state, _ = pretrain.restore_state(workdir)
  template_stats = jax.device_get(state["carry"]["obs_stats"])

  # The templates' environment: a width that is not a tile multiple, scalers by distillation; the
  # export starts from the templates' statistics and adds its own two rollouts of 32 observations.
  c = _config(policy_init, templates=workdir, targets="width=12", steps=2, adapt="distill", checkpoint_every=2)
  init_program.run(c, str(tmp_path / "distill"))
  meta = checkpoint.read_export_meta(str(tmp_path / "distill" / "d2-w12-o4-a1" / "export"))
  assert meta["scaler_training"]["adapt"] == "distill" and np.isfinite(meta["scaler_training"]["return_after"])
  assert meta["observation_stats"]["count"] == float(template_stats["count"]) + 2 * 32
  # Another morphology: the target's observation size is its environment's; statistics start anew.
  c = _config(policy_init, templates=workdir, targets="depth=2", steps=1, env="inverted_double_pendulum",
              checkpoint_every=1)
  init_program.run(c, str(tmp_path / "other"))
  export = str(tmp_path / "other" / "d2-w16-o8-a1" / "export")
  meta = checkpoint.read_export_meta(export)
  cfg = models.from_record(meta["model"])
  assert (cfg.obs_size, cfg.action_size) == (8, 1) and meta["scaler_training"]["adapt"] == "ppo"
  assert meta["observation_stats"]["count"] == 32 and len(meta["observation_stats"]["mean"]) == 8
  # Distillation needs the auxiliary's environment.
  c.adapt = "distill"
  with pytest.raises(ValueError, match="needs the auxiliary policy's environment"):
    init_program.validate(c, str(tmp_path / "other_distill"))

  # Training from that export starts from its statistics (and records its own in its export), and
  # refuses it for another morphology, before anything is written.
  tc = _config(policy_train, env="inverted_double_pendulum", init=export, total_steps=1)
  train.validate(tc, str(tmp_path / "train"))
  assert train.task_with_export(tc).obs_stats == meta["observation_stats"]
  carry = {"obs_stats": jax.tree_util.tree_map(np.asarray, tasks.control.stats_from_record(meta["observation_stats"]))}
  assert train.observation_stats({"carry": carry}) == {"observation_stats": meta["observation_stats"]}
  assert train.observation_stats({}) == {}  # other tasks' exports have none
  tc.env = "inverted_pendulum"
  with pytest.raises(ValueError, match=r"exported for other data sizes .*policy_init.py --config.env=inverted_pendulum"):
    train.validate(tc, str(tmp_path / "train_ip"))
  assert not (tmp_path / "train_ip").exists()
