"""Template, scaler and materialized parameter counts per model size, with the pre-training tiles.

  python benchmarks/param_counts.py [--tiles embed=64,mlp=64,heads=1,kv=16] [--num_templates 4]
  python benchmarks/param_counts.py --family resnet     # tiles of configs/resnet_pretrain.py
"""
import argparse
import importlib

from weit_jax import generator, models

DEFAULTS = {"vit": "Ti/16,S/16,B/16,L/16,H/14,g/14,G/14,e/14,22B/14", "resnet": "R26,R50,R101,R152"}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--family", default="vit", choices=sorted(models.FAMILIES))
  p.add_argument("--variants", default=None, help="comma-separated (default: the family's ImageNet sizes)")
  p.add_argument("--tiles", default=None, help="AXIS=TILE,... (default: configs/<family>_pretrain.py's)")
  p.add_argument("--num_templates", type=int, default=4)
  a = p.parse_args()
  family = models.get(a.family)
  if a.tiles:
    tiles = {k: int(v) for k, v in (kv.split("=") for kv in a.tiles.split(","))}
  else:
    tiles = dict(importlib.import_module(f"configs.{a.family}_pretrain").get_config().weit.tiles)
  print(f"tiles {tiles}, N={a.num_templates}, ImageNet-1k head (1000 classes), 224px\n")
  print("| model | materialized | templates | scalers | scalers / materialized |")
  print("|---|---:|---:|---:|---:|")
  for variant in (a.variants or DEFAULTS[a.family]).split(","):
    cfg = family.make_config(variant)
    gen = generator.WeightGenerator.from_model(models.build(cfg), *models.dummy_inputs(cfg), tiles=tiles,
                                               num_templates=a.num_templates)
    c = gen.counts()
    print(f"| {a.family} {variant} | {c['materialized']:,} | {c['templates']:,} | {c['scalers']:,} | "
          f"{c['scalers'] / c['materialized']:.2%} |")


if __name__ == "__main__":
  main()
