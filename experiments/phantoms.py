"""`medsd phantoms`: write procedural phantom data in an official dataset layout.

    medsd phantoms --layout mimic-cxr|rocov2|medvqa-gi --n N --out DIR [--seed S] [--image-size PX]

The folder reads like the real dataset's download (see datamodules/phantoms), so every DataModule,
the tests and the embedded demo run on it with nothing downloaded.
"""

from __future__ import annotations

from datamodules.phantoms import LAYOUTS, write_phantoms
from experiments.cli import command_parser


def main(argv: list[str]) -> None:
    parser = command_parser(prog="medsd phantoms", description=__doc__.splitlines()[0])
    parser.add_argument("--layout", required=True, choices=sorted(LAYOUTS))
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--out", required=True, help="new or empty folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=None, help="default: the layout's own")
    args = parser.parse_args(argv)
    out = write_phantoms(args.layout, args.n, args.out, seed=args.seed, image_size=args.image_size)
    print(out)
