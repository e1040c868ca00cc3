r"""An experiment on materializing across devices: the einsum composition (weit_jax.kron.compose)
vs an index form that computes each output entry from ``S[t, r // w]`` and ``T[t, r % w]``.

  python benchmarks/materialize_variants.py            # ViT-B/16; V=L/16 or V=H/14 for others

Why: with fsdp sharding, the einsum's (grid, tile) output is reshaped into a sharded axis whose
blocks do not line up with tiles (e.g. 12 tiles of 64 over 8 devices), so XLA materializes more
than one shard per device. The index form only broadcasts small inputs over the output's own
index space. Its gradient is a scatter, so it is not used in training; see docs/performance.md.
"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import time, statistics, jax, jax.numpy as jnp, numpy as np
from weit_jax import generator, sharding
from weit_jax.models import vit
import weit_jax.kron as K

def compose_index(s, t, shape=None):
  # W[r, c, ...] = sum_t S[t, r // w, ...] * T[t, r % w, ...]: pure broadcasts on the output index
  # space, so a sharded output is computed shard by shard with no reshape of a sharded dim.
  full = tuple(g * w for g, w in zip(s.shape[1:], t.shape[1:]))
  shape = full if shape is None else tuple(shape)
  k = s.ndim - 1
  si, ti = [], []
  for a, (n, w) in enumerate(zip(shape, t.shape[1:])):
    idx = jnp.arange(n)
    si.append(idx // w); ti.append(idx % w)
  grids_s = jnp.ix_(*si); grids_t = jnp.ix_(*ti)
  out = 0
  for i in range(s.shape[0]):
    out = out + s[i][grids_s] * t[i][grids_t]
  return out

orig = K.compose
cfg = vit.make_config(os.environ.get("V","B/16"))
gen = generator.WeightGenerator.from_model(vit.ViT(cfg), vit.dummy_input(cfg), tiles=dict(embed=64, mlp=64, heads=1, kv=16), num_templates=4)
T, S = gen.init(jax.random.key(0))
for ndev in (1, 8):
  mesh = sharding.make_mesh({"fsdp": ndev}, devices=jax.devices()[:ndev])
  out_sh = sharding.shardings(gen.param_shapes(), gen.param_axes(), mesh)
  tt = jax.device_put(T, sharding.shardings(gen.template_shapes(), gen.template_axes(), mesh))
  ss = jax.device_put(S, sharding.replicated(mesh))
  res = {}
  for name, fn in (("einsum", orig), ("index", compose_index)):
    K.compose = fn
    f = jax.jit(lambda a, b: gen.materialize(a, b), out_shardings=out_sh)
    m = f.lower(tt, ss).compile().memory_analysis()
    jax.block_until_ready(f(tt, ss))
    ts=[]
    for _ in range(3):
      t0=time.perf_counter(); jax.block_until_ready(f(tt, ss)); ts.append(time.perf_counter()-t0)
    res[name] = jax.device_get(f(tt, ss))
    print(ndev, name, round(statistics.median(ts),3), "temp MB", round(m.temp_size_in_bytes/1e6), "out MB", round(m.output_size_in_bytes/1e6), flush=True)
  d = max(float(np.abs(a-b).max()) for a,b in zip(jax.tree_util.tree_leaves(res["einsum"]), jax.tree_util.tree_leaves(res["index"])))
  print("maxdiff", d)
K.compose = orig
