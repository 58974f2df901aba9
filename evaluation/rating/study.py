"""A blinded rating study: its design, the images it draws, and the SQLite file that holds it all.

The study file holds the design (sources, raters, questions, prompt shown or hidden, seed, ...),
every drawn image re-encoded, each rater's queue and every answer:

    meta     design (JSON), the colour the images were encoded in, schema version
    raters   name, secret token, order
    items    source (`real` or a generated source's name), kind, where it came from, prompt,
             the finding asked about and whether the prompt states it, the re-encoded PNG
    queue    per rater: position, item, whether it is a repeat of an item shown earlier, the opaque
             id the image is served under, first shown at
    answers  per rater and position: turing, realism, finding, comment, answered at

Holding the images makes the study self-contained: serving it again needs neither the dataset nor
the sample folders, and what raters saw is what the report is about, whatever happens to those
folders later. Blinding is in the images themselves: each is read, centre-cropped to a square,
resized to one size, put in one colour mode and written as a fresh PNG, so size, mode and
metadata (PNG text chunks, EXIF) are the same for real and generated images. Every rater rates
the same items (what inter-rater agreement needs), each in an order of their own, and `repeats`
of them a second time, later and under another opaque id (what intra-rater agreement needs).

Each answer is one transaction, committed before the page moves on: a killed server loses
nothing answered, and a restart resumes every rater at their first unanswered image. A study file
is served by one process at a time (`StudyLock`).
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import random
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from datamodules.atomic import write_atomically
from datamodules.images import load_image, to_rgb
from evaluation.sample_folder import Generated

SCHEMA_VERSION = 1
QUESTIONS = ("turing", "realism", "finding", "comment")
REAL, GENERATED = "real", "generated"
# The answers each question accepts (comment: any text up to COMMENT_LIMIT characters).
CHOICES = {
    "turing": (REAL, "synthetic"),
    "realism": ("1", "2", "3", "4", "5"),
    "finding": ("yes", "no", "unsure"),
}
COMMENT_LIMIT = 5000
# Not a finding to ask about when the finding is taken from the labels: its absence is a finding.
NO_FINDING = "No Finding"
COLORS = ("auto", "gray", "rgb")


@dataclass(frozen=True)
class Candidate:
    """An image a source offers: its file (or an image in memory), prompt and label sets (one per
    record for a real image; the distinct label sets of its prompt's records for a generated
    one), and where it came from (kept for the report, never shown)."""

    image: str | Image.Image
    prompt: str
    label_sets: tuple[dict, ...]
    origin: str


@dataclass
class Design:
    """What a study is: changing any of it makes another study. `sources` are dicts with `name`
    and `kind` and what identifies them (the real split and config arguments, a sample folder)."""

    sources: list[dict]
    raters: list[str]
    questions: list[str] = field(default_factory=lambda: list(QUESTIONS))
    prompt: str = "hidden"
    seed: int = 0
    per_source: int = 20
    repeats: int = 0  # images each rater sees a second time, later in their queue (intra-rater agreement)
    real_count: int | None = None  # None: as many real images as generated ones (a 50/50 mix)
    finding: str | None = None
    image_size: int = 512
    color: str = "auto"

    def __post_init__(self):
        unknown = sorted(set(self.questions) - set(QUESTIONS))
        if unknown or not self.questions:
            raise ValueError(f"questions {unknown or '(none)'}: choose from {', '.join(QUESTIONS)}")
        if self.prompt not in ("shown", "hidden"):
            raise ValueError(f"prompt {self.prompt!r}: 'shown' or 'hidden'")
        if self.color not in COLORS:
            raise ValueError(f"color {self.color!r}: one of {', '.join(COLORS)}")
        if not self.raters or len(set(self.raters)) != len(self.raters) or not all(self.raters):
            raise ValueError(f"raters {self.raters}: give one or more distinct names")
        if (
            self.per_source < 1
            or self.repeats < 0
            or (self.real_count is not None and self.real_count < 1)
            or self.image_size < 8
        ):
            raise ValueError("per_source and real_count must be >= 1, repeats >= 0, image_size >= 8")
        names = [s["name"] for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"two sources share a name: {names}")
        if [s["kind"] for s in self.sources].count(REAL) != 1 or len(self.sources) < 2:
            raise ValueError("a study needs the real images and at least one generated source")

    def as_dict(self) -> dict:
        return asdict(self)

    def real_images(self) -> int:
        return self.real_count or self.per_source * (len(self.sources) - 1)

    def differences(self, given: dict) -> list[str]:
        """How the settings `given` (a subset of the design's fields) differ from this design."""
        mine = self.as_dict()
        text = {"sources": _sources_text}
        return [
            f"{key}: the study has {text.get(key, repr)(mine[key])}, "
            f"the command gives {text.get(key, repr)(value)}"
            for key, value in given.items()
            if _comparable(mine[key]) != _comparable(value)
        ]


def _comparable(value):
    return json.loads(json.dumps(value))  # tuples as lists, as the stored design has them


def _sources_text(sources: list[dict]) -> str:
    """`real (test split of --config a.yaml), lora (/runs/lora/samples)`."""
    return ", ".join(
        f"{s['name']} ({s['split']} split of {' '.join(s['data']) or 'no config'})"
        if s["kind"] == REAL
        else f"{s['name']} ({s['folder']})"
        for s in sources
    )


def real_candidates(records: list, split: str) -> list[Candidate]:
    """The images of a dataset split's records (`datamodules.base.Record`)."""
    if not records:
        raise ValueError(f"the {split!r} split has no records: no real images to rate")
    return [
        Candidate(
            r.image,
            r.prompt,
            (dict(r.labels or {}),),
            r.image if isinstance(r.image, str) else f"{split}[{i}]",
        )
        for i, r in enumerate(records)
    ]


def generated_candidates(folder: str | Path) -> list[Candidate]:
    """The images of a `medsd sample` folder (an error naming the folder when it has no manifest)."""
    generated = Generated.from_folder(folder)
    if not generated.paths:
        raise ValueError(f"{folder}: the manifest lists no images")
    return [
        Candidate(str(path), prompt, tuple(labels), str(path))
        for path, prompt, labels in zip(generated.paths, generated.prompts, generated.labels, strict=True)
    ]


def finding_of(label_sets: tuple[dict, ...], fixed: str | None) -> tuple[str | None, bool | None]:
    """The finding to ask about and whether the image's prompt states it (True), denies or omits it
    (False) or is uncertain or contradicts itself across its label sets (None).

    fixed: one finding for every image; otherwise each image's first positive finding in the
    labels' order (never NO_FINDING), and no finding question for an image that has none."""
    if fixed is None:
        positive = [name for name in (label_sets[0] if label_sets else {}) if name != NO_FINDING]
        positive = [name for name in positive if all(s.get(name) == 1.0 for s in label_sets)]
        return (positive[0], True) if positive else (None, None)
    stated = {_stated(s.get(fixed)) for s in label_sets}
    return fixed, stated.pop() if len(stated) == 1 else None


def _stated(value) -> bool | None:
    if value is None or value == 0.0:
        return False  # not mentioned counts as absent, as in the CheXpert convention for "negative"
    return True if value == 1.0 else None


def blinded_png(image: str | Image.Image, size: int, gray: bool) -> bytes:
    """The image as raters see it: centre-cropped to a square, resized to size x size, in one
    colour mode, encoded afresh (no text chunks, EXIF or other metadata of the original)."""
    rgb = load_image(image, draft_size=size) if isinstance(image, str) else to_rgb(image)
    square = ImageOps.fit(rgb, (size, size), method=Image.Resampling.LANCZOS)
    if gray:
        square = square.convert("L")
    pixels = Image.fromarray(np.asarray(square))  # a new image: nothing of the original's info
    out = io.BytesIO()
    pixels.save(out, format="PNG", optimize=False, compress_level=6)
    return out.getvalue()


def is_grayscale(image: str | Image.Image) -> bool:
    """Whether the image's three channels are equal (read reduced: a 3000 px radiograph is slow)."""
    rgb = np.asarray(load_image(image, draft_size=256) if isinstance(image, str) else to_rgb(image))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


class StudyInUse(SystemExit):
    """Another process serves the study. A SystemExit: the command ends with its one line."""


class StudyLock:
    """An exclusive lock on `<study>.lock` (flock), held while a process serves or creates the
    study, holding the owner's PID. The kernel releases it when its owner ends, even by SIGKILL,
    so a killed server never leaves a stale lock behind."""

    def __init__(self, study: str | Path):
        self.path = Path(f"{study}.lock")
        self._fd: int | None = None

    def __enter__(self) -> StudyLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StudyInUse(
                f"{self.path.with_suffix('')} is in use by another process (pid {holder}, lock file "
                f"{self.path}): one server per study; stop that one first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing releases the flock
            self._fd = None


SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE raters (name TEXT PRIMARY KEY, token TEXT UNIQUE NOT NULL, ord INTEGER NOT NULL);
CREATE TABLE items (id INTEGER PRIMARY KEY, source TEXT NOT NULL, kind TEXT NOT NULL,
    origin TEXT NOT NULL, prompt TEXT NOT NULL, finding TEXT, finding_truth INTEGER, png BLOB NOT NULL);
CREATE TABLE queue (rater TEXT NOT NULL REFERENCES raters(name), position INTEGER NOT NULL,
    item INTEGER NOT NULL REFERENCES items(id), repeat INTEGER NOT NULL, opaque TEXT UNIQUE NOT NULL,
    shown_at REAL, PRIMARY KEY (rater, position));
CREATE TABLE answers (rater TEXT NOT NULL, position INTEGER NOT NULL, turing TEXT, realism INTEGER,
    finding TEXT, comment TEXT, answered_at REAL NOT NULL, PRIMARY KEY (rater, position),
    FOREIGN KEY (rater, position) REFERENCES queue(rater, position));
"""


def draw(design: Design, candidates: dict[str, list[Candidate]]) -> list[tuple[str, Candidate]]:
    """`per_source` candidates of each generated source and `real_count` real ones (by default as
    many as all generated ones together), drawn with the study's seed: (source, candidate)."""
    drawn = []
    for source in design.sources:
        offered = candidates.get(source["name"], [])
        wanted = design.per_source if source["kind"] != REAL else design.real_images()
        if len(offered) < wanted:
            setting = "real_count" if source["kind"] == REAL else "per_source"
            raise ValueError(
                f"source {source['name']!r} has {len(offered)} images, fewer than {setting} ({wanted})"
            )
        chosen = random.Random(f"{design.seed}/items/{source['name']}").sample(offered, wanted)
        drawn += [(source["name"], c) for c in chosen]
    return drawn


def queue_order(design: Design, rater: str, items: int) -> list[tuple[int, int]]:
    """A rater's queue, (item, repeat): every item once in an order of the rater's own, and
    `repeats` of them a second time (repeat 1) at a random later place."""
    if design.repeats > items:
        raise ValueError(f"repeats ({design.repeats}) is more than the study's {items} images")
    rng = random.Random(f"{design.seed}/order/{rater}")
    order = list(range(items))
    rng.shuffle(order)
    queue = [(item, 0) for item in order]
    for item in rng.sample(order, design.repeats):
        first = queue.index((item, 0))
        queue.insert(rng.randint(first + 1, len(queue)), (item, 1))
    return queue


class Study:
    """An existing study file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such study file")
        try:
            with self._connect(read_only=True) as db:
                meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as error:
            raise ValueError(f"{self.path} is not a rating study ({error})") from None
        if int(meta.get("schema", -1)) != SCHEMA_VERSION:
            raise ValueError(
                f"{self.path}: study schema {meta.get('schema')}, this medsd reads {SCHEMA_VERSION}"
            )
        self.design = Design(**json.loads(meta["design"]))
        self.color = meta["color"]

    @classmethod
    def create(cls, path: str | Path, design: Design, candidates: dict[str, list[Candidate]]) -> Study:
        """Draws the images, encodes them and writes the study file whole (atomically): a failure
        on the way leaves no study file behind."""
        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{path} exists already")
        if design.finding is not None:
            names = {
                name for offered in candidates.values() for c in offered for s in c.label_sets for name in s
            }
            if design.finding not in names:
                raise ValueError(
                    f"finding {design.finding!r} is in no image's labels; they have {sorted(names)}"
                )
        drawn = draw(design, candidates)
        kinds = {s["name"]: s["kind"] for s in design.sources}
        color = design.color
        if color == "auto":
            real = [c.image for name, c in drawn if kinds[name] == REAL]
            color = "gray" if all(is_grayscale(image) for image in real) else "rgb"

        queues = {rater: queue_order(design, rater, len(drawn)) for rater in design.raters}

        def write(tmp: Path) -> None:
            with closing(sqlite3.connect(tmp)) as db, db:
                db.executescript(SCHEMA)
                db.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [("schema", str(SCHEMA_VERSION)), ("design", json.dumps(design.as_dict())),
                     ("color", color), ("created", time.strftime("%Y-%m-%dT%H:%M:%S"))],
                )  # fmt: skip
                for item, (name, c) in enumerate(drawn):
                    finding, truth = finding_of(c.label_sets, design.finding)
                    png = blinded_png(c.image, design.image_size, color == "gray")
                    db.execute(
                        "INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (item, name, kinds[name], c.origin, c.prompt, finding, truth, png),
                    )
                for order, rater in enumerate(design.raters):
                    db.execute(
                        "INSERT INTO raters VALUES (?, ?, ?)", (rater, secrets.token_urlsafe(16), order)
                    )
                    db.executemany(
                        "INSERT INTO queue (rater, position, item, repeat, opaque) VALUES (?, ?, ?, ?, ?)",
                        [(rater, p, item, repeat, secrets.token_urlsafe(12))
                         for p, (item, repeat) in enumerate(queues[rater])],
                    )  # fmt: skip

        write_atomically(path, write, sync=True)
        return cls(path)

    @contextmanager
    def _connect(self, read_only: bool = False) -> Iterator[sqlite3.Connection]:
        """A connection whose `with` block is one transaction (committed at its end)."""
        uri = f"file:{self.path.resolve()}{'?mode=ro' if read_only else ''}"
        with closing(sqlite3.connect(uri, uri=True, timeout=30)) as db, db:
            db.row_factory = sqlite3.Row
            yield db

    def raters(self) -> list[tuple[str, str]]:
        """(name, token) of each rater, in the design's order."""
        with self._connect(read_only=True) as db:
            return [tuple(r) for r in db.execute("SELECT name, token FROM raters ORDER BY ord")]

    def rater(self, token: str) -> str | None:
        with self._connect(read_only=True) as db:
            row = db.execute("SELECT name FROM raters WHERE token = ?", (token,)).fetchone()
        return row["name"] if row else None

    def progress(self, rater: str) -> tuple[int, int]:
        """(answered, queued) of a rater."""
        with self._connect(read_only=True) as db:
            (answered,) = db.execute("SELECT COUNT(*) FROM answers WHERE rater = ?", (rater,)).fetchone()
            (queued,) = db.execute("SELECT COUNT(*) FROM queue WHERE rater = ?", (rater,)).fetchone()
        return answered, queued

    def current(self, rater: str) -> dict | None:
        """The rater's first unanswered image (opaque id, prompt, finding, position), marked as
        shown; None once every image is answered."""
        with self._connect() as db:
            row = db.execute(
                "SELECT q.position, q.opaque, i.prompt, i.finding FROM queue q JOIN items i ON i.id = q.item "
                "WHERE q.rater = ? AND q.position NOT IN (SELECT position FROM answers WHERE rater = ?) "
                "ORDER BY q.position LIMIT 1",
                (rater, rater),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE queue SET shown_at = ? WHERE rater = ? AND position = ? AND shown_at IS NULL",
                (time.time(), rater, row["position"]),
            )
        return dict(row)

    def image(self, rater: str, opaque: str) -> bytes | None:
        """The PNG served under `opaque`, if that id is in this rater's queue."""
        with self._connect(read_only=True) as db:
            row = db.execute(
                "SELECT i.png FROM queue q JOIN items i ON i.id = q.item WHERE q.rater = ? AND q.opaque = ?",
                (rater, opaque),
            ).fetchone()
        return row["png"] if row else None

    def answer(self, rater: str, opaque: str, form: dict[str, str]) -> bool:
        """Records the rater's answers to the image served under `opaque`, in one transaction.
        False when the id is not in their queue; an image answered already keeps its first answers
        (a resubmitted form changes nothing). A ValueError names a missing or invalid answer."""
        with self._connect() as db:
            row = db.execute(
                "SELECT q.position, i.finding FROM queue q JOIN items i ON i.id = q.item "
                "WHERE q.rater = ? AND q.opaque = ?",
                (rater, opaque),
            ).fetchone()
            if row is None:
                return False
            values = self._checked(form, asked_finding=row["finding"] is not None)
            db.execute(
                "INSERT OR IGNORE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?)",
                (rater, row["position"], values["turing"], values["realism"], values["finding"],
                 values["comment"], time.time()),
            )  # fmt: skip
        return True

    def _checked(self, form: dict[str, str], asked_finding: bool) -> dict:
        asked = set(self.design.questions) - ({"finding"} if not asked_finding else set())
        values: dict = dict.fromkeys(QUESTIONS)
        for question in sorted(asked - {"comment"}):
            value = (form.get(question) or "").strip()
            if value not in CHOICES[question]:
                raise ValueError(f"{question}: answer one of {', '.join(CHOICES[question])}")
            values[question] = int(value) if question == "realism" else value
        if "comment" in asked:
            values["comment"] = (form.get("comment") or "").strip()[:COMMENT_LIMIT] or None
        return values

    def answers(self) -> list[dict]:
        """Every answer with what it was about (unblinded), in rater and position order."""
        with self._connect(read_only=True) as db:
            rows = db.execute(
                "SELECT a.rater, a.position, q.item, i.source, i.kind, i.origin, i.prompt, i.finding AS "
                "finding_asked, i.finding_truth, a.turing, a.realism, a.finding, a.comment, "
                "q.repeat, a.answered_at - q.shown_at AS seconds FROM answers a JOIN queue q USING (rater, "
                "position) JOIN items i ON i.id = q.item JOIN raters r ON r.name = a.rater "
                "ORDER BY r.ord, a.position"
            ).fetchall()
        return [dict(r) for r in rows]
