"""`medsd rate serve|report`: a blinded expert rating of real and generated images.

    medsd rate serve --db study.sqlite --config RUN.yaml [--data.init_args.root DIR] --real-split test
        (--samples DIR [DIR ...] | --sweep SWEEP) --raters alice,bob [--per-source 20]
        [--questions turing,realism,finding,comment] [--prompt hidden|shown] [--finding NAME]
        [--real-count N] [--repeats 0] [--seed 0] [--image-size 512] [--color auto|gray|rgb]
        [--host 127.0.0.1] [--port 8765]
    medsd rate serve --db study.sqlite          # serve an existing study again: everyone resumes
    medsd rate report --db study.sqlite [--out DIR]

`serve` creates the study on its first run (evaluation/rating/study.py): `--per-source` images are
drawn from each generated source (a `medsd sample` folder, or every cell of a sweep whose sampling
has finished) and `--real-count` from the real split (a `medsd fit` config's DataModule; by
default as many as the generated images together, so that the mix is half real), with the seed;
all are re-encoded alike and stored in the study file, and every rater gets the same images in an
order of their own (`--repeats N` of them twice, for intra-rater agreement). It prints one link
per rater, `http://HOST:PORT/r/<token>`, the same links on every later run. The questions:
`turing` (real or synthetic?), `realism` (1-5), `finding` ("does the image show <finding>?",
yes / no / unsure: `--finding NAME` for every image, else each image's first positive label),
`comment` (free text); `--prompt shown` shows each image's prompt. The server listens on
127.0.0.1 unless `--host` says otherwise.

A later `serve` on the same file resumes it; design options given then must match the stored
design, or it refuses, naming each difference (a new design needs a new --db). One server per
study file: a second is refused, naming the first's PID.

`report` writes the numbers (evaluation/rating/report.py) to `--out`, by default `<sweep>/rating`
for a study of a sweep's cells (where the sweep report looks for `report.json`), else
`<db folder>/<db name>-report`; it can run while the server runs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from evaluation.rating.study import GENERATED, QUESTIONS, REAL, Design, Study, StudyLock

from .cli import command_parser, parse_with_config_args
from .matrix import Cell
from .sweep import CellFolder

# The design options of `serve` (by their argparse names): None when not given, so that a rerun
# on an existing study compares only what it was given.
DESIGN_OPTIONS = (
    "raters", "questions", "prompt", "seed", "per_source", "real_count", "repeats", "finding", "image_size",
    "color",
)  # fmt: skip


def sweep_sample_folders(sweep: str | Path) -> dict[str, Path]:
    """Cell name -> samples folder of each cell of a sweep whose sample stage has finished."""
    sweep = Path(sweep)
    if not sweep.is_dir():
        raise FileNotFoundError(f"{sweep}: no such sweep folder")
    folders = {}
    for plan in sorted(sweep.glob("*/cell.json")):
        cell = json.loads(plan.read_text())
        folder = CellFolder(sweep, Cell(tuple(cell["labels"].items()), tuple(cell["fit_args"])))
        if "sample" not in folder.remaining_stages():
            folders[folder.cell.name] = folder.samples
        else:
            logging.getLogger(__name__).warning("cell %s has not sampled yet: left out", folder.cell.name)
    if not folders:
        raise ValueError(f"{sweep}: no cell has finished sampling")
    return folders


def generated_sources(args) -> dict[str, Path]:
    """Source name -> sample folder: sweep cells by name, sample folders by folder name (with
    their parent's where two share one)."""
    if args.sweep:
        return sweep_sample_folders(args.sweep)
    folders = [Path(f).resolve() for f in args.samples or []]
    names = [f.name for f in folders]
    names = [f"{f.parent.name}/{f.name}" if names.count(f.name) > 1 else f.name for f in folders]
    if len(set(names)) != len(names) or REAL in names:
        raise ValueError(f"the sample folders need distinct names other than {REAL!r}: {names}")
    return dict(zip(names, folders, strict=True))


def given_design(args, config_args: list[str]) -> dict:
    """The design settings this command states: the sources only when it names any."""
    given = {key: getattr(args, key) for key in DESIGN_OPTIONS if getattr(args, key) is not None}
    for key in ("raters", "questions"):
        if key in given:
            given[key] = [part.strip() for part in given[key].split(",") if part.strip()]
    if args.samples or args.sweep or config_args or args.real_split:
        real = {"name": REAL, "kind": REAL, "split": args.real_split or "test", "data": config_args}
        given["sources"] = [real] + [
            {
                "name": name,
                "kind": GENERATED,
                "folder": str(folder),
                "sweep": args.sweep and str(Path(args.sweep).resolve()),
            }
            for name, folder in generated_sources(args).items()
        ]
    return given


def create_study(db: Path, given: dict) -> Study:
    from evaluation.rating.study import generated_candidates, real_candidates

    if "sources" not in given or len(given["sources"]) < 2:
        raise ValueError(
            f"{db} does not exist yet: give the real images (--config RUN.yaml --real-split SPLIT) and the "
            "generated ones (--samples DIR ... or --sweep SWEEP) to create it"
        )
    if "raters" not in given:
        raise ValueError("give the raters of the new study: --raters alice,bob")
    design = Design(**given)
    real, *generated = design.sources
    if not real["data"]:
        raise ValueError("give the real images: --config RUN.yaml (a `medsd fit` config) --real-split SPLIT")
    candidates = {s["name"]: generated_candidates(s["folder"]) for s in generated}  # cheap checks first
    from experiments.lightning_cli import build_datamodule  # here: it imports Lightning

    records = build_datamodule(real["data"]).records(real["split"])
    candidates[REAL] = real_candidates(records, real["split"])
    return Study.create(db, design, candidates)


def serve(argv: list[str]) -> None:
    parser = command_parser(
        prog="medsd rate serve",
        description=(
            "serve a rating study, creating it on the first run; the real images come from a `medsd fit` "
            "config (--config RUN.yaml, --data.init_args.root DIR, ...). Unset design options: the "
            "stored design's for an existing study, the defaults named here for a new one"
        ),
    )
    parser.add_argument("--db", required=True, help="the study file (SQLite), created on the first run")
    parser.add_argument("--samples", nargs="+", help="`medsd sample` folders: the generated sources")
    parser.add_argument("--sweep", help="a sweep folder: each cell's samples are a generated source")
    parser.add_argument("--real-split", help="the split of the config's DataModule; new study: test")
    parser.add_argument("--raters", help="comma-separated rater names")
    parser.add_argument(
        "--per-source", type=int, help="images drawn from each generated source; new study: 20"
    )
    parser.add_argument(
        "--real-count", type=int, help="real images drawn; new study: as many as the generated ones (50/50)"
    )
    parser.add_argument(
        "--repeats", type=int, help="images each rater sees twice, for intra-rater agreement; new study: 0"
    )
    parser.add_argument("--questions", help=f"comma-separated, of {','.join(QUESTIONS)}; new study: all")
    parser.add_argument(
        "--prompt", choices=["shown", "hidden"], help="show each image's prompt; new study: hidden"
    )
    parser.add_argument(
        "--finding",
        help="the finding asked about for every image; new study: each one's first positive label",
    )
    parser.add_argument("--seed", type=int, help="draws the images and each rater's order; new study: 0")
    parser.add_argument("--image-size", type=int, help="side of the square images shown; new study: 512")
    parser.add_argument(
        "--color",
        choices=["auto", "gray", "rgb"],
        help="auto (new study's default): gray when the real images are",
    )
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    parser.add_argument("--port", type=int, default=8765)
    args, config_args = parse_with_config_args(parser, argv)
    if args.samples and args.sweep:
        raise SystemExit("medsd rate serve: give --samples or --sweep, not both")
    db = Path(args.db)
    with StudyLock(db):
        try:
            given = given_design(args, config_args)
            if db.exists():
                study = Study(db)
                differences = study.design.differences(given)
                if differences:
                    raise SystemExit(
                        f"medsd rate serve: {db} holds another study design; it differs in\n  "
                        + "\n  ".join(differences)
                        + "\nserve it with `--db` alone (or the same options), or give a new --db"
                    )
            else:
                study = create_study(db, given)
        except (FileNotFoundError, FileExistsError, ValueError) as error:
            raise SystemExit(f"medsd rate serve: error: {error}") from None
        from evaluation.rating.server import create_app

        answered = {name: study.progress(name) for name, _ in study.raters()}
        print(f"study {db}: one link per rater (keep them secret: a link is its rater's login)")
        for name, token in study.raters():
            done, queued = answered[name]
            print(
                f"  {name}: http://{args.host}:{args.port}/r/{token}   ({done}/{queued} answered)", flush=True
            )
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"listening on {args.host}: anyone who can reach this machine and holds a link can rate")
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # its request lines hold the tokens
        create_app(study).run(host=args.host, port=args.port, threaded=True, use_reloader=False)


def default_out(study: Study) -> Path:
    sweeps = {s.get("sweep") for s in study.design.sources if s["kind"] != REAL}
    if len(sweeps) == 1 and None not in sweeps:
        return Path(sweeps.pop()) / "rating"
    return study.path.parent / f"{study.path.name}-report"


def report(argv: list[str]) -> None:
    from evaluation.rating.report import build_report, write_report

    parser = command_parser(prog="medsd rate report", description="a rating study's numbers")
    parser.add_argument("--db", required=True, help="the study file")
    parser.add_argument("--out", help="default: <sweep>/rating for a sweep's study, else <db>-report")
    args = parser.parse_args(argv)
    try:
        study = Study(args.db)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"medsd rate report: error: {error}") from None
    out = Path(args.out) if args.out else default_out(study)
    print(f"report: {write_report(build_report(study), out)}")


def main(argv: list[str]) -> None:
    commands = {"serve": serve, "report": report}
    if not argv or argv[0] not in commands:
        raise SystemExit("usage: medsd rate serve|report ... (medsd rate serve --help for its options)")
    commands[argv[0]](argv[1:])
