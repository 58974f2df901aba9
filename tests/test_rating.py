"""`medsd rate`: its statistics against references and simulations, the study file, the web app
through Flask's test client, and the refusals on bad input. (The real browser and the killed
server are tests/test_rating_browser.py.)

Expected numbers come from references (scikit-learn, SciPy, closed forms, a published worked
example, statsmodels where it is installed) or from counts made here from the study file's own
tables, never from the code under test.
"""

import hashlib
import json
import re
import sqlite3
import struct

import numpy as np
import pytest
from PIL import Image
from scipy.stats import binomtest
from sklearn.metrics import cohen_kappa_score

from evaluation.rating.agreement import category_counts, clopper_pearson, cohen_kappa, fleiss_kappa
from evaluation.rating.report import build_report, rating_section, write_report
from evaluation.rating.server import create_app
from evaluation.rating.study import (
    Candidate,
    Design,
    Study,
    StudyLock,
    finding_of,
    generated_candidates,
    real_candidates,
)
from experiments import rate
from tests.helpers.rating import EFFUSION, write_image, write_sample_folder

# --- statistics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (10, 10), (17, 40), (1, 1)])
def test_clopper_pearson_equals_closed_forms_and_scipy(k, n):
    low, high = clopper_pearson(k, n)
    if k == 0:  # closed forms of the exact interval at the ends
        assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / n))
    if k == n:
        assert high == 1.0 and low == pytest.approx(0.025 ** (1 / n))
    exact = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")  # Clopper-Pearson
    assert (low, high) == pytest.approx((exact.low, exact.high))


@pytest.mark.parametrize("p", [0.5, 0.8, 0.95])
def test_clopper_pearson_covers_a_simulated_raters_accuracy_at_least_nominally(p):
    """4000 simulated raters of known accuracy p answer 30 images each: the 95% interval holds p
    for at least 95% of them, less three Monte Carlo standard errors."""
    n, raters = 30, 4000
    intervals = np.array([clopper_pearson(k, n) for k in range(n + 1)])
    correct = np.random.default_rng(0).binomial(n, p, size=raters)
    covered = (intervals[correct, 0] <= p) & (p <= intervals[correct, 1])
    assert covered.mean() >= 0.95 - 3 * np.sqrt(0.95 * 0.05 / raters)


def test_cohen_kappa_equals_scikit_learn():
    rng = np.random.default_rng(1)
    for categories in (["real", "synthetic"], [1, 2, 3, 4, 5], ["yes", "no", "unsure"]):
        first = list(rng.choice(categories, 50))
        second = [a if rng.random() < 0.6 else rng.choice(categories) for a in first]
        assert cohen_kappa(first, second) == pytest.approx(cohen_kappa_score(first, second))


def test_quadratic_weighted_kappa_equals_scikit_learn():
    rng = np.random.default_rng(6)
    first = list(rng.integers(1, 6, 40))
    second = [int(np.clip(a + rng.integers(-1, 2), 1, 5)) for a in first]
    expected = cohen_kappa_score(first, second, labels=[1, 2, 3, 4, 5], weights="quadratic")
    assert cohen_kappa(first, second, scale=(1, 2, 3, 4, 5)) == pytest.approx(expected)
    assert cohen_kappa(first, second, scale=(1, 2, 3, 4, 5)) > cohen_kappa(first, second)  # near misses


def test_cohen_kappa_of_independent_raters_is_zero_on_average():
    """Two raters answering independently agree only by chance: kappa's expectation is 0."""
    rng = np.random.default_rng(2)
    kappas = [cohen_kappa(list(rng.random(60) < 0.3), list(rng.random(60) < 0.6)) for _ in range(2000)]
    assert abs(np.mean(kappas)) < 3 * np.std(kappas) / np.sqrt(len(kappas))


# The worked example of Fleiss' kappa (10 subjects, 14 raters, 5 categories) with its published
# intermediate values: P-bar 0.378, P-bar-e 0.213, kappa 0.210.
FLEISS_EXAMPLE = [
    [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
]  # fmt: skip


def test_fleiss_kappa_equals_the_published_worked_example():
    table = np.array(FLEISS_EXAMPLE)
    p_bar = np.mean([(row @ row - 14) / (14 * 13) for row in table])  # by hand, row by row
    p_e = sum((table[:, j].sum() / 140) ** 2 for j in range(5))
    assert (round(p_bar, 3), round(p_e, 3)) == (0.378, 0.213)
    assert round(fleiss_kappa(table), 3) == 0.210
    assert fleiss_kappa(table) == pytest.approx((p_bar - p_e) / (1 - p_e))


def test_fleiss_kappa_equals_statsmodels():
    """Where statsmodels is installed (it is no dependency of medsd's)."""
    inter_rater = pytest.importorskip("statsmodels.stats.inter_rater")
    rng = np.random.default_rng(3)
    answers = [list(rng.choice(["yes", "no", "unsure"], 4, p=[0.5, 0.3, 0.2])) for _ in range(30)]
    table = category_counts(answers)
    assert table.sum(axis=1).tolist() == [4] * 30
    assert fleiss_kappa(table) == pytest.approx(inter_rater.fleiss_kappa(table, method="fleiss"))


def test_finding_asked_is_the_first_positive_label_or_the_one_given():
    labels = ({"No Finding": 1.0, "Edema": 0.0, EFFUSION: 1.0, "Pneumonia": 1.0},)
    assert finding_of(labels, None) == (EFFUSION, True)
    assert finding_of(({"No Finding": 1.0, EFFUSION: None},), None) == (None, None)
    assert finding_of(labels, "Edema") == ("Edema", False)
    assert finding_of(({"Edema": -1.0},), "Edema") == ("Edema", None)  # uncertain: no truth
    assert finding_of(({"Edema": 1.0}, {"Edema": 0.0}), "Edema") == ("Edema", None)  # contradicts


# --- the study ----------------------------------------------------------------------------------

RATERS = ["alice", "bob", "carol"]


def make_study(tmp_path, raters=RATERS, per_source=4, **design) -> Study:
    """Real images (grayscale, 40 x 32, named real_*.png) and two generated sources (RGB squares)."""
    real = []
    for i in range(10):
        path = write_image(tmp_path / "dataset" / f"real_{i}.png", i, mode="L", note="real acquired")
        real.append(Candidate(str(path), f"report {i}", ({EFFUSION: 1.0 if i < 5 else 0.0},), str(path)))
    candidates = {"real": real}
    for seed, name in enumerate(["cell-lora", "cell-full"], start=1):
        candidates[name] = generated_candidates(write_sample_folder(tmp_path / name, 5, seed))
    sources = [{"name": "real", "kind": "real", "split": "test", "data": []}]
    sources += [
        {"name": n, "kind": "generated", "folder": str(tmp_path / n)} for n in ("cell-lora", "cell-full")
    ]
    design = Design(sources=sources, raters=list(raters), per_source=per_source, image_size=24, **design)
    return Study.create(tmp_path / "study.sqlite", design, candidates)


def truth(study: Study) -> dict:
    """rater -> opaque id -> (kind, source, finding asked, finding truth), read from the tables."""
    with sqlite3.connect(study.path) as db:
        rows = db.execute(
            "SELECT q.rater, q.opaque, i.kind, i.source, i.finding, i.finding_truth FROM queue q "
            "JOIN items i ON i.id = q.item"
        ).fetchall()
    table: dict = {}
    for rater, opaque, *about in rows:
        table.setdefault(rater, {})[opaque] = tuple(about)
    return table


def current_opaque(client, token: str) -> str | None:
    html = client.get(f"/r/{token}").get_data(as_text=True)
    found = re.search(r'/r/[\w-]+/image/([\w-]+)"', html)
    return found.group(1) if found else None


def png_chunks(data: bytes) -> list[str]:
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        chunks.append(data[at + 4 : at + 8].decode())
        at += 12 + length
    return chunks


def test_every_rater_gets_the_same_images_in_an_order_of_their_own(tmp_path):
    study = make_study(tmp_path)
    with sqlite3.connect(study.path) as db:
        order = "SELECT item FROM queue WHERE rater = ? ORDER BY position"
        queues = {r: [i for (i,) in db.execute(order, (r,))] for r in RATERS}
        sources = dict(db.execute("SELECT source, COUNT(*) FROM items GROUP BY source").fetchall())
    assert sources == {"real": 8, "cell-lora": 4, "cell-full": 4}  # half real by default
    assert all(sorted(q) == list(range(16)) for q in queues.values())
    assert len({tuple(q) for q in queues.values()}) == 3
    tokens = [token for _, token in study.raters()]
    assert len(set(tokens)) == 3 and all(len(t) >= 20 for t in tokens)
    assert Study(study.path).raters() == study.raters()  # the same links after a restart


def test_images_are_re_encoded_alike_without_metadata(tmp_path):
    """Real 40 x 32 grayscale PNGs and generated 48 x 48 RGB ones, all carrying a text chunk and
    EXIF naming them, come out as 24 x 24 grayscale PNGs with no chunk but the image's own."""
    study = make_study(tmp_path)
    app = create_app(study).test_client()
    for name, token in study.raters()[:1]:
        for opaque in truth(study)[name]:
            response = app.get(f"/r/{token}/image/{opaque}")
            assert response.status_code == 200 and response.mimetype == "image/png"
            assert png_chunks(response.data) == ["IHDR", "IDAT", "IEND"]
            image = Image.open(__import__("io").BytesIO(response.data))
            assert (image.size, image.mode, image.info) == ((24, 24), "L", {})


def test_answers_survive_a_reopen_and_the_rater_resumes_where_they_stopped(tmp_path):
    study = make_study(tmp_path)
    (name, token), (_, other) = study.raters()[:2]
    client = create_app(study).test_client()
    answered = []
    for _ in range(3):
        opaque = current_opaque(client, token)
        reply = client.post(
            f"/r/{token}/answer/{opaque}", data={"turing": "real", "realism": "4", "finding": "no"}
        )
        assert reply.status_code == 303
        answered.append(opaque)
    again = client.post(f"/r/{token}/answer/{answered[0]}", data={"turing": "synthetic", "realism": "1"})
    assert again.status_code == 303  # a resubmitted form keeps the first answers
    reopened = create_app(Study(study.path)).test_client()
    assert "Image 4 of 16 for alice" in reopened.get(f"/r/{token}").get_data(as_text=True)
    assert current_opaque(reopened, token) not in answered
    assert "Image 1 of 16 for bob" in reopened.get(f"/r/{other}").get_data(as_text=True)
    with sqlite3.connect(study.path) as db:
        rows = db.execute("SELECT turing, realism, finding FROM answers WHERE rater = ?", (name,)).fetchall()
    assert len(rows) == 3 and rows[0][:2] == ("real", 4)


def test_a_rater_reaches_only_their_own_queue(tmp_path):
    study = make_study(tmp_path)
    (alice, alice_token), (_, bob_token) = study.raters()[:2]
    client = create_app(study).test_client()
    alice_image = next(iter(truth(study)[alice]))
    assert client.get(f"/r/{alice_token}/image/{alice_image}").status_code == 200
    assert client.get(f"/r/{bob_token}/image/{alice_image}").status_code == 404
    posted = client.post(f"/r/{bob_token}/answer/{alice_image}", data={"turing": "real", "realism": "3"})
    assert posted.status_code == 404
    for path in ("/", "/r/", "/r/not-a-token", f"/r/{alice_token}x", f"/r/not-a-token/image/{alice_image}"):
        assert client.get(path).status_code == 404, path
    with sqlite3.connect(study.path) as db:
        assert db.execute("SELECT COUNT(*) FROM answers").fetchone() == (0,)


def test_pages_do_not_tell_real_from_generated(tmp_path):
    """Every page of a rater's queue is the same text but for its opaque ids, progress and the
    finding question (asked where the prompt has a positive finding, of real and generated images
    alike), and names no source, cell, folder or file."""
    study = make_study(tmp_path, prompt="hidden")
    name, token = study.raters()[0]
    about = truth(study)[name]
    client = create_app(study).test_client()
    pages, asked = set(), set()
    hints = (
        "cell-lora",
        "cell-full",
        "dataset",
        ".png",
        "real_",
        "images/",
        "acquired",
        "generated",
        "report ",
    )
    while (opaque := current_opaque(client, token)) is not None:
        html = client.get(f"/r/{token}").get_data(as_text=True)
        assert not [hint for hint in hints if hint in html]
        kind, _, finding, _ = about[opaque]
        page = re.sub(r"Image \d+ of", "Image N of", html.replace(opaque, "ID"))
        pages.add(re.sub(r"<fieldset>\s*<legend>Does the image show .*?</fieldset>", "", page, flags=re.S))
        asked.add((kind, finding is not None))
        client.post(f"/r/{token}/answer/{opaque}", data={"turing": "real", "realism": "2", "finding": "yes"})
    assert len(pages) == 1
    assert asked == {("real", True), ("real", False), ("generated", True), ("generated", False)}


def test_a_shown_prompt_is_on_the_page_as_text(tmp_path):
    study = make_study(tmp_path, prompt="shown")
    name, token = study.raters()[0]
    with sqlite3.connect(study.path) as db:
        db.execute("UPDATE items SET prompt = '<b>effusion</b> & more' WHERE kind = 'real'")
        prompts = dict(db.execute("SELECT q.opaque, i.prompt FROM queue q JOIN items i ON i.id = q.item"))
    client = create_app(study).test_client()
    while (opaque := current_opaque(client, token)) is not None:
        html = client.get(f"/r/{token}").get_data(as_text=True)
        escaped = prompts[opaque].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        assert f'<p id="prompt">Prompt: {escaped}</p>' in html
        client.post(f"/r/{token}/answer/{opaque}", data={"turing": "real", "realism": "2", "finding": "no"})
    assert study.progress(name) == (16, 16)


def test_an_incomplete_answer_is_refused_and_not_recorded(tmp_path):
    study = make_study(tmp_path)
    _, token = study.raters()[0]
    client = create_app(study).test_client()
    opaque = current_opaque(client, token)
    reply = client.post(f"/r/{token}/answer/{opaque}", data={"turing": "real", "realism": "7"})
    assert reply.status_code == 400 and "realism: answer one of 1, 2, 3, 4, 5" in reply.get_data(as_text=True)
    assert study.progress("alice") == (0, 16)


def answer_all(study: Study, rng) -> dict:
    """Each rater answers every image at random (the finding only where asked): opaque -> answers."""
    client = create_app(study).test_client()
    given = {}
    for name, token in study.raters():
        given[name] = {}
        while (opaque := current_opaque(client, token)) is not None:
            form = {"turing": str(rng.choice(["real", "synthetic"])), "realism": str(rng.integers(1, 6)),
                    "finding": str(rng.choice(["yes", "no", "unsure"])), "comment": "looks fine"}  # fmt: skip
            assert client.post(f"/r/{token}/answer/{opaque}", data=form).status_code == 303
            given[name][opaque] = form
    return given


def test_the_report_equals_a_hand_count_of_the_answers(tmp_path):
    study = make_study(tmp_path)
    given = answer_all(study, np.random.default_rng(4))
    about = truth(study)
    report = build_report(study)

    for row in report["turing"][:3]:  # per rater
        mine = [(about[row["rater"]][o][0], a["turing"]) for o, a in given[row["rater"]].items()]
        correct = sum((kind, guess) in {("real", "real"), ("generated", "synthetic")} for kind, guess in mine)
        assert (row["accuracy"]["k"], row["accuracy"]["n"]) == (correct, 16)
        synthetic = [guess for kind, guess in mine if kind == "generated"]
        assert (row["sensitivity"]["k"], row["sensitivity"]["n"]) == (synthetic.count("synthetic"), 8)
        real = [guess for kind, guess in mine if kind == "real"]
        assert (row["specificity"]["k"], row["specificity"]["n"]) == (real.count("real"), 8)
    with sqlite3.connect(study.path) as db:
        query = "SELECT a.answered_at - q.shown_at FROM answers a JOIN queue q USING (rater, position) "
        query += "WHERE a.rater = ?"
        for row in report["progress"]:
            seconds = [t for (t,) in db.execute(query, (row["rater"],))]
            assert (row["answered"], row["queued"]) == (16, 16)
            assert row["median_seconds"] == pytest.approx(np.median(seconds))
    pooled = report["turing"][3]
    assert pooled["rater"] == "pooled" and pooled["accuracy"]["n"] == 48
    assert pooled["accuracy"]["k"] == sum(r["accuracy"]["k"] for r in report["turing"][:3])

    for cell in report["cells"]:
        answers = [
            (about[r][o], a) for r in RATERS for o, a in given[r].items() if about[r][o][1] == cell["source"]
        ]
        scores = [int(a["realism"]) for _, a in answers]
        assert cell["realism"]["mean"] == pytest.approx(np.mean(scores))
        assert cell["realism"]["sd"] == pytest.approx(np.std(scores, ddof=1))
        asked = [(t, a["finding"]) for (_, _, finding, t), a in answers if finding is not None]
        decided = [(t, f) for t, f in asked if f != "unsure" and t is not None]
        assert cell["finding"]["agreement"]["n"] == len(decided)
        assert cell["finding"]["agreement"]["k"] == sum((f == "yes") == bool(t) for t, f in decided)
        called = sum(a["turing"] == "synthetic" for _, a in answers)
        assert (cell["called_synthetic"]["k"], cell["called_synthetic"]["n"]) == (called, len(answers))
        assert len(answers) == 3 * (8 if cell["kind"] == "real" else 4)

    by_item = {}
    with sqlite3.connect(study.path) as db:
        item_of = dict(db.execute("SELECT opaque, item FROM queue").fetchall())
    for rater in RATERS:
        for opaque, form in given[rater].items():
            by_item.setdefault(item_of[opaque], []).append(form["turing"])
    # Fleiss' kappa of the turing answers by hand: 3 raters, two categories.
    real = np.array([by_item[i].count("real") for i in sorted(by_item)])
    synthetic = 3 - real
    p_bar = np.mean((real * (real - 1) + synthetic * (synthetic - 1)) / 6)
    share = real.sum() / (3 * len(real))
    p_e = share**2 + (1 - share) ** 2
    (turing,) = [a for a in report["agreement"] if a["question"] == "turing"]
    assert turing["method"] == "Fleiss' kappa" and turing["items"] == 16
    assert turing["kappa"] == pytest.approx((p_bar - p_e) / (1 - p_e))


def test_two_raters_agreement_is_cohens_kappa_and_the_report_is_written(tmp_path):
    study = make_study(tmp_path, raters=["alice", "bob"])
    given = answer_all(study, np.random.default_rng(5))
    with sqlite3.connect(study.path) as db:
        item_of = dict(db.execute("SELECT opaque, item FROM queue").fetchall())
    realism = {r: {item_of[o]: int(a["realism"]) for o, a in given[r].items()} for r in ("alice", "bob")}
    items = sorted(realism["alice"])
    expected = cohen_kappa_score([realism["alice"][i] for i in items], [realism["bob"][i] for i in items])
    report = build_report(study)
    rows = {a["method"]: a["kappa"] for a in report["agreement"] if a["question"] == "realism"}
    assert rows["Cohen's kappa"] == pytest.approx(expected)
    first, second = [realism["alice"][i] for i in items], [realism["bob"][i] for i in items]
    weighted = cohen_kappa_score(first, second, labels=[1, 2, 3, 4, 5], weights="quadratic")
    assert rows["Cohen's kappa, quadratic weights"] == pytest.approx(weighted)

    out = tmp_path / "report"
    write_report(report, out)
    assert json.loads((out / "report.json").read_text())["agreement"] == json.loads(
        json.dumps(report["agreement"])
    )
    tables = {f"{name}.csv" for name in ("turing", "cells", "agreement", "intra_rater", "answers")}
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md", *tables}
    section = rating_section(report)
    assert section.startswith("## Expert rating") and (out / "report.md").read_text() == section
    alice = report["turing"][0]["accuracy"]
    assert f"{alice['k']}/16" in section and "Cohen's kappa" in section and "cell-lora" in section


def test_repeated_images_measure_each_raters_agreement_with_themselves(tmp_path):
    """Three images come back later in each queue under new ids; the report's other numbers count
    first answers only."""
    study = make_study(tmp_path, raters=["alice", "bob"], repeats=3)
    with sqlite3.connect(study.path) as db:
        queue = db.execute(
            "SELECT rater, position, item, repeat, opaque FROM queue ORDER BY rater, position"
        ).fetchall()
    for rater in ("alice", "bob"):
        mine = [row for row in queue if row[0] == rater]
        repeated = [(position, item) for _, position, item, repeat, _ in mine if repeat]
        assert len(mine) == 19 and len(repeated) == 3
        first_at = {item: position for _, position, item, repeat, _ in mine if not repeat}
        assert sorted(first_at) == list(range(16)) and all(first_at[item] < p for p, item in repeated)
    assert len({row[4] for row in queue}) == len(queue)  # a repeat has an id of its own

    given = answer_all(study, np.random.default_rng(7))
    report = build_report(study)
    about = {opaque: (rater, item, repeat) for rater, _, item, repeat, opaque in queue}
    for rater in ("alice", "bob"):
        firsts = {about[o][1]: a for o, a in given[rater].items() if not about[o][2]}
        seconds = {about[o][1]: a for o, a in given[rater].items() if about[o][2]}
        rows = {r["question"]: r for r in report["intra_rater"] if r["rater"] == rater}
        items = sorted(seconds)
        realism = [int(firsts[i]["realism"]) for i in items], [int(seconds[i]["realism"]) for i in items]
        expected = cohen_kappa_score(*realism, labels=[1, 2, 3, 4, 5], weights="quadratic")
        assert rows["realism"]["items"] == 3 and rows["realism"]["kappa"] == pytest.approx(expected)
        same = sum(firsts[i]["turing"] == seconds[i]["turing"] for i in items)
        assert (rows["turing"]["identical"]["k"], rows["turing"]["identical"]["n"]) == (same, 3)
    assert [row["accuracy"]["n"] for row in report["turing"]] == [16, 16, 32]
    assert "### Intra-rater agreement (3 images shown twice to each rater)" in rating_section(report)


# --- the command and bad input ------------------------------------------------------------------


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_serve_resumes_a_study_given_its_own_design_and_prints_each_raters_link(
    tmp_path, monkeypatch, capsys
):
    import flask

    study = make_study(tmp_path)
    runs = []
    monkeypatch.setattr(flask.Flask, "run", lambda app, **options: runs.append(options))
    same = [
        "--seed",
        "0",
        "--prompt",
        "hidden",
        "--raters",
        ",".join(RATERS),
        "--per-source",
        "4",
        "--port",
        "9",
    ]
    rate.main(["serve", "--db", str(study.path), *same])
    assert runs == [{"host": "127.0.0.1", "port": 9, "threaded": True, "use_reloader": False}]
    printed = capsys.readouterr().out
    for name, token in study.raters():
        assert f"  {name}: http://127.0.0.1:9/r/{token}   (0/16 answered)" in printed


def test_serve_refuses_another_design_naming_the_difference(tmp_path):
    study = make_study(tmp_path)
    before = digest(study.path)
    with pytest.raises(SystemExit) as refused:
        rate.main(["serve", "--db", str(study.path), "--seed", "1", "--prompt", "shown"])
    message = str(refused.value)
    assert "seed: the study has 0, the command gives 1" in message
    assert "prompt: the study has 'hidden', the command gives 'shown'" in message
    with pytest.raises(SystemExit, match="raters: the study has"):
        rate.main(["serve", "--db", str(study.path), "--raters", "alice,bob"])
    with pytest.raises(SystemExit) as refused:
        rate.main(["serve", "--db", str(study.path), "--samples", str(tmp_path / "cell-lora")])
    lora = tmp_path / "cell-lora"
    assert (
        f"sources: the study has real (test split of no config), cell-lora ({lora}), cell-full "
        f"({tmp_path / 'cell-full'}), the command gives real (test split of no config), cell-lora ({lora})"
    ) in str(refused.value)
    assert digest(study.path) == before


def test_a_second_server_on_the_study_is_refused_naming_the_first(tmp_path):
    study = make_study(tmp_path)
    with StudyLock(study.path):
        with pytest.raises(SystemExit, match=rf"in use by another process \(pid {__import__('os').getpid()}"):
            rate.main(["serve", "--db", str(study.path)])
    with StudyLock(study.path):  # released by the first holder
        pass


def test_a_sample_folder_without_manifest_is_refused_before_anything_is_written(tmp_path):
    empty = tmp_path / "samples"
    empty.mkdir()
    db = tmp_path / "new.sqlite"
    with pytest.raises(SystemExit, match=r"manifest.csv not found: give the output folder of `medsd sample`"):
        rate.main(["serve", "--db", str(db), "--samples", str(empty), "--raters", "a", "--config", "x.yaml"])
    assert not db.exists()


def test_an_empty_split_and_too_few_images_are_refused(tmp_path):
    with pytest.raises(ValueError, match="the 'test' split has no records"):
        real_candidates([], "test")
    with pytest.raises(ValueError, match=r"source 'cell-lora' has 5 images, fewer than per_source \(6\)"):
        make_study(tmp_path, per_source=6, real_count=4)
    with pytest.raises(ValueError, match=r"source 'real' has 10 images, fewer than real_count \(12\)"):
        make_study(tmp_path, per_source=6)
    with pytest.raises(
        ValueError, match=r"finding 'Pleural effusion' is in no image's labels; they have \['No Finding'"
    ):
        make_study(tmp_path, finding="Pleural effusion")
    assert not (tmp_path / "study.sqlite").exists()


def test_a_file_that_is_not_a_study_is_refused(tmp_path):
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(SystemExit, match="is not a rating study"):
        rate.main(["report", "--db", str(other)])
    with pytest.raises(SystemExit, match="no such study file"):
        rate.main(["report", "--db", str(tmp_path / "missing.sqlite")])


def test_a_sweeps_sampled_cells_are_its_sources_and_its_report_goes_to_sweep_rating(tmp_path):
    sweep = tmp_path / "sweep"
    for name, stage in (("strategy-lora", "evaluate"), ("strategy-full", "sample"), ("strategy-dora", "fit")):
        (sweep / name).mkdir(parents=True)
        (sweep / name / "cell.json").write_text(json.dumps({"labels": {"strategy": name.split("-")[1]},
                                                            "fit_args": []}))  # fmt: skip
        (sweep / name / "status.json").write_text(json.dumps({"state": "running", "stage": stage}))
    assert rate.sweep_sample_folders(sweep) == {
        "strategy-full": sweep / "strategy-full" / "samples",
        "strategy-lora": sweep / "strategy-lora" / "samples",
    }
    study = make_study(tmp_path)
    study.design.sources[1]["sweep"] = str(sweep)
    study.design.sources[2]["sweep"] = str(sweep)
    assert rate.default_out(study) == sweep / "rating"
    assert rate.default_out(Study(study.path)) == tmp_path / "study.sqlite-report"
