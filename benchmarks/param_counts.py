"""Template, scaler and materialized parameter counts per ViT size, with the pre-training tiles.

  python benchmarks/param_counts.py [--tiles embed=64,mlp=64,heads=1,kv=16] [--num_templates 4]
"""
import argparse

from weit_jax import generator
from weit_jax.models import vit


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variants", default="Ti/16,S/16,B/16,L/16,H/14")
  p.add_argument("--tiles", default="embed=64,mlp=64,heads=1,kv=16")
  p.add_argument("--num_templates", type=int, default=4)
  a = p.parse_args()
  tiles = {k: int(v) for k, v in (kv.split("=") for kv in a.tiles.split(","))}
  print(f"tiles {tiles}, N={a.num_templates}, ImageNet-1k head (1000 classes), 224px\n")
  print("| model | materialized | templates | scalers | scalers / materialized |")
  print("|---|---:|---:|---:|---:|")
  for variant in a.variants.split(","):
    cfg = vit.make_config(variant)
    gen = generator.WeightGenerator.from_model(vit.ViT(cfg), vit.dummy_input(cfg), tiles=tiles,
                                               num_templates=a.num_templates)
    c = gen.counts()
    print(f"| ViT-{variant} | {c['materialized']:,} | {c['templates']:,} | {c['scalers']:,} | "
          f"{c['scalers'] / c['materialized']:.2%} |")


if __name__ == "__main__":
  main()
