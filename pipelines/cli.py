"""The `raydiff` command line."""

from __future__ import annotations

import argparse
import sys


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from diffusion.unet import PRESETS, UNet, UNetConfig, count_parameters

    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    for name in PRESETS:
        print(f"U-Net preset {name!r}: {count_parameters(UNet(UNetConfig.preset(name))) / 1e6:.2f}M parameters")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions and model sizes").set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
