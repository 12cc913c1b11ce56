"""Takes docs/web_ui.png: a short real conversation with the bundled model in the chat page, in headless
Chromium (the browser tests' helpers). Run from the repository root: `python docs/web_ui_screenshot.py`."""

import sys
from pathlib import Path

from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from browser import chromium  # noqa: E402
from serving import start_server  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Write a Python function that reverses a string."]


def main() -> None:
    server = start_server()
    base = next(server)["base"]
    driver = chromium()
    try:  # the page itself 1200 x 800 (the window's size includes what a browser draws around it)
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": 1200, "height": 800, "deviceScaleFactor": 1, "mobile": False})
        driver.get(base + "/")
        for element_id, value in (("system", "You are a helpful assistant."), ("temperature", "0"),
                                  ("max_tokens", "200")):
            driver.execute_script("document.getElementById(arguments[0]).value = arguments[1]", element_id, value)
        for question in QUESTIONS:
            driver.find_element("id", "prompt").send_keys(question, "\n")
            WebDriverWait(driver, 120).until(lambda d: d.find_element("id", "send").is_displayed())
        driver.save_screenshot(str(ROOT / "docs" / "web_ui.png"))
    finally:
        driver.quit()
        server.close()


if __name__ == "__main__":
    main()
