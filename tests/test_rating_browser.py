"""`medsd rate` as a person uses it: a rater in a real (headless) browser, a server killed with
SIGKILL mid-session and started again, a second rater over plain HTTP, then the report.

The study is made by the command itself from chest phantoms (the real split, through a `medsd
fit` config's DataModule) and two sample folders; the report's numbers are checked against counts
made here from the answers given and what each image was, read from the study file's tables.
"""

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from datamodules.phantoms import write_phantoms
from experiments import rate
from tests.browser import browser, image_load_failures  # noqa: F401
from tests.helpers.rating import write_sample_folder

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[1] / "experiments/configs/tiny/phantoms/mimic_cxr.yaml"
SOURCES = ("samples-lora-r8", "samples-full-ft")
PER_SOURCE = 3
QUEUE = 4 * PER_SOURCE  # half of them real
LINK = re.compile(r"^\s+(\w+): (http://127\.0\.0\.1:\d+/r/[\w-]+)\s", re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], log: Path, timeout: float = 240) -> tuple[subprocess.Popen, dict]:
    """`medsd rate serve ARGS` in its own process, once it answers: (process, rater -> link)."""
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "experiments.cli", "rate", "serve", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server ended (code {process.returncode}):\n{log.read_text()}")
        links = dict(LINK.findall(log.read_text()))
        if len(links) == 2:
            try:
                urllib.request.urlopen(links["alice"], timeout=5).read()
                return process, links
            except OSError:
                pass
        time.sleep(0.5)
    process.kill()
    raise AssertionError(f"the server did not answer in {timeout} s:\n{log.read_text()}")


def study_truth(db: Path) -> dict:
    """opaque id -> (rater, item, kind) from the study file's own tables."""
    with sqlite3.connect(db) as connection:
        rows = connection.execute(
            "SELECT q.opaque, q.rater, q.item, i.kind FROM queue q JOIN items i ON i.id = q.item"
        ).fetchall()
    return {opaque: (rater, item, kind) for opaque, rater, item, kind in rows}


def answers_for(rng) -> dict:
    return {
        "turing": str(rng.choice(["real", "synthetic"])),
        "realism": str(rng.integers(1, 6)),
        "finding": str(rng.choice(["yes", "no", "unsure"])),
        "comment": f"note {rng.integers(1000)}",
    }


def rate_in_browser(driver, link: str, rng, seen: list) -> tuple[str, dict]:
    """Opens the rater's link, answers the image shown with the mouse and keyboard, saves."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(link)
    assert image_load_failures(driver) == []
    image = driver.find_element(By.ID, "image")
    opaque = image.get_attribute("src").rsplit("/", 1)[1]
    seen.append((driver.page_source, image.get_attribute("src")))
    form = answers_for(rng)
    asked = driver.find_elements(By.CSS_SELECTOR, "input[name=finding]")
    for question in ("turing", "realism") + (("finding",) if asked else ()):
        driver.find_element(By.CSS_SELECTOR, f'input[name="{question}"][value="{form[question]}"]').click()
    if not asked:
        del form["finding"]
    driver.find_element(By.NAME, "comment").send_keys(form["comment"])
    driver.find_element(By.ID, "submit").click()
    WebDriverWait(driver, 30).until(expected_conditions.staleness_of(image))
    # The next page (after the POST's redirect) loaded before the test opens the link again.
    WebDriverWait(driver, 30).until(
        lambda d: (
            d.execute_script("return document.readyState") == "complete"
            and d.find_elements(By.CSS_SELECTOR, "#progress, #done")
        )
    )
    return opaque, form


def rate_over_http(link: str, rng) -> dict:
    """The second rater's whole queue, as plain form posts."""
    given = {}
    while True:
        html = urllib.request.urlopen(link, timeout=10).read().decode()
        found = re.search(r'action="(/r/[\w-]+/answer/([\w-]+))"', html)
        if found is None:
            assert 'id="done"' in html
            return given
        form = answers_for(rng)
        if 'name="finding"' not in html:
            del form["finding"]
        url = urllib.parse.urljoin(link, found.group(1))
        urllib.request.urlopen(url, data=urllib.parse.urlencode(form).encode(), timeout=10).read()
        given[found.group(2)] = form


def test_a_rater_in_a_browser_loses_nothing_to_a_killed_server(browser, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By

    phantoms = write_phantoms("mimic-cxr", 40, tmp_path / "phantoms", seed=0, image_size=32)
    for seed, name in enumerate(SOURCES, start=1):
        write_sample_folder(tmp_path / name, 6, seed)
    db, port = tmp_path / "study.sqlite", free_port()
    design = ["--config", str(CONFIG), "--data.init_args.root", str(phantoms), "--real-split", "train",
              "--samples", *[str(tmp_path / name) for name in SOURCES], "--raters", "alice,bob",
              "--per-source", str(PER_SOURCE), "--seed", "7", "--prompt", "hidden"]  # fmt: skip
    server, links = start_server(["--db", str(db), *design, "--port", str(port)], tmp_path / "serve1.log")
    rng, seen, alice = np.random.default_rng(0), [], {}
    try:
        for _ in range(4):
            opaque, form = rate_in_browser(browser, links["alice"], rng, seen)
            alice[opaque] = form
    finally:
        os.kill(server.pid, signal.SIGKILL)
        server.wait()

    with sqlite3.connect(db) as connection:  # what was answered is in the file, the server dead
        assert connection.execute("SELECT COUNT(*) FROM answers WHERE rater = 'alice'").fetchone() == (4,)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(links["alice"], timeout=5)

    server, again = start_server(["--db", str(db), "--port", str(port)], tmp_path / "serve2.log")
    try:
        assert again == links  # the same links after the restart
        command = [sys.executable, "-m", "experiments.cli", "rate", "serve", "--db", str(db)]
        second = subprocess.run(
            [*command, "--port", str(free_port())], capture_output=True, text=True, timeout=120
        )
        assert second.returncode != 0 and f"in use by another process (pid {server.pid}" in second.stderr
        browser.get(links["alice"])
        assert browser.find_element(By.ID, "progress").text.startswith(f"Image 5 of {QUEUE} for alice.")
        for _ in range(QUEUE - 4):
            opaque, form = rate_in_browser(browser, links["alice"], rng, seen)
            alice[opaque] = form
        browser.get(links["alice"])
        assert browser.find_element(By.ID, "done").text.startswith(f"All {QUEUE} images are rated")
        bob = rate_over_http(links["bob"], rng)
        for opaque in alice:  # bob's token opens none of alice's images or answers
            token = links["bob"].rsplit("/", 1)[1]
            for url, data in (
                (f"/r/{token}/image/{opaque}", None),
                (f"/r/{token}/answer/{opaque}", b"turing=real"),
            ):
                with pytest.raises(urllib.error.HTTPError) as refused:
                    urllib.request.urlopen(urllib.parse.urljoin(links["bob"], url), data=data, timeout=10)
                assert refused.value.code == 404
    finally:
        server.terminate()
        server.wait()

    # Nothing in the pages or the image URLs tells a real image from a generated one.
    truth = study_truth(db)
    assert len(alice) == len(bob) == QUEUE and set(alice) | set(bob) == set(truth)
    names = [*SOURCES, "phantoms", "images/", "000000_", ".png", ".jpg", "real", "synthetic", "generated"]
    names += [p.stem for p in phantoms.rglob("*.jpg")][:20]
    for html, src in seen:
        assert re.fullmatch(rf"http://127\.0\.0\.1:{port}/r/[\w-]+/image/[\w-]+", src)
        assert not [name for name in names if name in src.split("/r/", 1)[1]]
        assert not [name for name in names[:7] if name in html]
    templates = {re.sub(r"<fieldset>\s*<legend>Does the image show .*?</fieldset>", "", re.sub(
        r"/image/[\w-]+|/answer/[\w-]+|Image \d+ of", "", html), flags=re.S) for html, _ in seen}  # fmt: skip
    assert len(templates) == 1

    out = tmp_path / "rating"
    rate.main(["report", "--db", str(db), "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    for rater, given in (("alice", alice), ("bob", bob)):
        calls = [(truth[o][2], form["turing"]) for o, form in given.items()]
        correct = sum(call in {("real", "real"), ("generated", "synthetic")} for call in calls)
        (row,) = [r for r in report["turing"] if r["rater"] == rater]
        assert (row["accuracy"]["k"], row["accuracy"]["n"]) == (correct, QUEUE)
        assert row["accuracy"]["value"] == pytest.approx(correct / QUEUE)
        generated = [call for kind, call in calls if kind == "generated"]
        assert (row["sensitivity"]["k"], row["sensitivity"]["n"]) == (generated.count("synthetic"), 6)
    raters = {"alice": alice, "bob": bob}
    by_item = {rater: {truth[o][1]: f["turing"] for o, f in given.items()} for rater, given in raters.items()}
    items = sorted(by_item["alice"])
    expected = cohen_kappa_score([by_item["alice"][i] for i in items], [by_item["bob"][i] for i in items])
    (turing,) = [a for a in report["agreement"] if a["question"] == "turing"]
    assert turing["kappa"] == pytest.approx(expected)
    with sqlite3.connect(db) as connection:
        query = "SELECT q.opaque, a.comment FROM answers a JOIN queue q USING (rater, position)"
        comments = dict(connection.execute(query).fetchall())
    assert all(comments[o] == form["comment"] for o, form in {**alice, **bob}.items())
    assert "## Expert rating" in (out / "report.md").read_text()
