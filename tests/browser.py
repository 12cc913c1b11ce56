"""A headless Chromium driven by selenium (Debian's `chromium` and `chromium-driver`), for the chat page's tests
and its screenshot in docs/. Without them the tests skip, except under CI (CI=true, as .ci/run sets), where
that is a failure."""

import os
import shutil

import pytest


def chromium():
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        _missing("Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium (the dev extra)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary  # both paths given: selenium never looks for (or downloads) a browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1200,800", "--hide-scrollbars"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def _missing(what: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true, and the browser tests need {what}")
    pytest.skip(f"the browser tests need {what}")
