"""A real headless browser for tests: the system's Chromium driven through Selenium.

    from tests.browser import browser, image_load_failures  # noqa: F401

`browser` yields a `selenium.webdriver.Chrome` on /usr/bin/chromium through /usr/bin/chromedriver
(named explicitly, so Selenium Manager never tries to download a driver or a browser), with a
fresh profile in a temporary folder and no network services of its own. Without Chromium the
tests that use it are skipped, except under CI (the CI variable set), where that is a failure:
CI installs Chromium and must not skip silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
OPTIONS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1200,1000",
)


@pytest.fixture
def browser(tmp_path_factory):
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        message = f"{', '.join(missing)} missing: install Debian's chromium and chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for option in OPTIONS:
        options.add_argument(option)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def image_load_failures(driver, timeout: float = 30) -> list[str]:
    """The src of each <img> of the current page that failed to load: naturalWidth 0 once every
    image has finished loading or failing (waited for up to `timeout` seconds)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(
        lambda d: d.execute_script(
            "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete);"
        )
    )
    return driver.execute_script(
        "return Array.from(document.images).filter(img => img.naturalWidth === 0).map(img => img.src);"
    )
