"""The chat page at / (server/web/): served public beside a protected API, turned off by --no-web-ui, and used
in a real headless Chromium against the real server (the session's `server`, with --api-key): a streamed
conversation equal to the API's own replies, stop, reload, errors, and model text shown as text."""

import json
import re

import pytest
import uvicorn
from fastapi.testclient import TestClient

from browser import chromium
from minillm import cli
from minillm.server.app import create_app
from serving import API_KEY, free_port, metric, post, wait_until_idle


def test_page_is_public_and_the_api_is_not():
    client = TestClient(create_app(None, "m", api_key="secret"))
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/chat.js"' in page.text
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "unsafe-inline" not in csp  # no inline script, no other origin
    assert client.get("/chat.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/chat.css").status_code == 200
    assert client.post("/v1/chat/completions", json={"messages": []}).status_code == 401
    assert client.get("/v1/models").status_code == 401


def test_no_web_ui_flag_serves_no_page(monkeypatch):
    apps = []

    def run(server, sockets):  # instead of serving: keep the app built from the command line
        apps.append(server.config.app)
        sockets[0].close()

    monkeypatch.setattr(uvicorn.Server, "run", run)
    assert cli.main(["serve", "--no-web-ui", "--port", str(free_port())]) == 0
    for path in ("/", "/chat.js", "/chat.css"):
        response = TestClient(apps[0]).get(path)
        assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


# ---- in the browser ----

@pytest.fixture
def browser(request):
    """A fresh Chromium (an empty localStorage) on the page of the session's server."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium()  # first: no server started for a test that skips without a browser
    driver.wait = lambda condition, timeout=60: WebDriverWait(driver, timeout, 0.05).until(lambda d: condition())
    driver.get(request.getfixturevalue("server")["base"] + "/")
    yield driver
    driver.quit()


@pytest.fixture
def page(browser):
    """The page with the API key given, and its settings for short greedy replies."""
    browser.execute_script("localStorage.setItem('minillm.apiKey', arguments[0])", API_KEY)
    browser.refresh()
    browser.wait(lambda: browser.find_element("id", "model").text == "smollm2")
    field(browser, "temperature", 0)
    field(browser, "max_tokens", 8)
    return browser


def field(driver, element_id, text):
    driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event('change'))", element_id, str(text))


def send(driver, text):
    """Type a message, send it with Enter, and wait until its reply has finished (or failed)."""
    driver.find_element("id", "prompt").send_keys(text, "\n")
    driver.wait(lambda: driver.find_element("id", "send").is_displayed())


def stored(driver) -> list[dict]:
    return json.loads(driver.execute_script("return localStorage.getItem('minillm.chat')"))["messages"]


def shown(driver) -> list[str]:
    return [m.text for m in driver.find_elements("css selector", ".message")]


def error_line(driver) -> str:
    error = driver.find_element("id", "error")
    return error.text if error.is_displayed() else ""


@pytest.mark.slow  # the session's server and a browser
def test_the_key_is_asked_for_once(browser):
    browser.wait(lambda: browser.find_element("id", "key-form").is_displayed())
    assert "API key" in error_line(browser) and not browser.find_element("id", "model").text
    browser.find_element("id", "api-key").send_keys("wrong\n")
    browser.wait(lambda: "API key" in error_line(browser))
    browser.find_element("id", "api-key").clear()
    browser.find_element("id", "api-key").send_keys(API_KEY + "\n")
    browser.wait(lambda: browser.find_element("id", "model").text == "smollm2")
    assert not browser.find_element("id", "key-form").is_displayed() and not error_line(browser)
    browser.refresh()  # kept: not asked again
    browser.wait(lambda: browser.find_element("id", "model").text == "smollm2")
    assert not browser.find_element("id", "key-form").is_displayed()


@pytest.mark.slow
def test_a_streamed_conversation_is_the_api_reply(server, page):
    system = "You are a terse assistant."
    field(page, "system", system)
    history = [{"role": "system", "content": system}]
    for question in ("Name three colors.", "And three animals?"):
        send(page, question)
        history.append({"role": "user", "content": question})
        reply = post(server, "/v1/chat/completions", {"messages": history, "temperature": 0, "max_tokens": 8})
        history.append({"role": "assistant", "content": reply.json()["choices"][0]["message"]["content"]})
    assert [(m["role"], m["content"]) for m in stored(page)] == [(m["role"], m["content"]) for m in history[1:]]
    stats = [e.text for e in page.find_elements("css selector", ".message.assistant .stats")]
    assert len(stats) == 2 and all(re.fullmatch(r"8 tokens · [\d.]+ tok/s · TTFT \d+ ms", s) for s in stats), stats
    assert not error_line(page)
    page.find_element("id", "new-chat").click()
    assert stored(page) == [] and shown(page) == []


@pytest.mark.slow
def test_stop_aborts_the_request_and_reload_keeps_the_conversation(server, page):
    field(page, "max_tokens", 2000)
    page.find_element("id", "prompt").send_keys("Count from 1 to 1000, one number per line.\n")
    page.wait(lambda: page.find_element("id", "send").is_displayed() or page.execute_script(
        "return document.querySelector('.message.assistant .body').textContent.length > 20"))
    assert metric(server, "minillm_num_requests_running") == 1  # still generating
    page.find_element("id", "stop").click()
    page.wait(lambda: page.find_element("id", "send").is_displayed())
    wait_until_idle(server, timeout=10)  # the engine dropped the request and freed its blocks
    assert page.find_element("css selector", ".message.assistant .stats").text.endswith("stopped")
    before = shown(page)
    assert len(before) == 2 and len(stored(page)[1]["content"]) > 20
    page.refresh()
    page.wait(lambda: page.find_element("id", "model").text == "smollm2")
    assert shown(page) == before


@pytest.mark.slow
def test_errors_show_one_line_and_keep_the_conversation(page):
    send(page, "Hi")
    before, on_screen = stored(page), shown(page)
    field(page, "temperature", -1)  # refused by the server: a 400 naming the field
    send(page, "Hello there")
    assert error_line(page).startswith("Server error 400:") and "temperature" in error_line(page)
    assert page.find_element("id", "prompt").get_attribute("value") == "Hello there"  # to send again
    assert stored(page) == before and shown(page) == on_screen
    field(page, "temperature", 0)
    page.set_network_conditions(offline=True, latency=0, download_throughput=-1, upload_throughput=-1)
    try:
        send(page, "")
        assert error_line(page).startswith("Lost the connection to the server")
    finally:
        page.delete_network_conditions()
    assert stored(page) == before and shown(page) == on_screen
    page.execute_script("localStorage.setItem('minillm.apiKey', 'wrong')")
    send(page, "")
    assert "API key" in error_line(page) and page.find_element("id", "key-form").is_displayed()
    assert stored(page) == before and shown(page) == on_screen
    page.find_element("id", "api-key").send_keys(API_KEY + "\n")
    page.wait(lambda: not error_line(page))
    send(page, "")
    assert len(stored(page)) == 4 and not error_line(page)


HOSTILE = '<img src=x onerror="window.pwned=1"> <script>window.pwned=2</script>'


@pytest.mark.slow
def test_model_text_is_shown_as_text(page):
    # A reply streamed by the real model, made markup by adding guided_choice to the page's request
    page.execute_script("""const choice = arguments[0], fetch = window.fetch;
        window.fetch = (url, init) =>
          fetch(url, {...init, body: JSON.stringify({...JSON.parse(init.body), guided_choice: [choice]})});""",
                        HOSTILE)
    field(page, "max_tokens", 64)
    send(page, HOSTILE)
    assert stored(page)[-1]["content"] == HOSTILE
    assert [b.text for b in page.find_elements("css selector", ".message .body")] == [HOSTILE, HOSTILE]
    # Markdown, and markup in it, rendered from a stored conversation (the path of a streamed reply too)
    reply = ("# Title\n\nSome **bold**, *italic* and `<b>code</b>`.\n\n- one\n- two\n\n"
             "```python\nprint('<script>alert(1)</script>')\n```\n\n"
             "[ok](https://example.com) [bad](javascript:window.pwned=3) " + HOSTILE)
    page.execute_script("localStorage.setItem('minillm.chat', JSON.stringify({messages: ["
                        "{role: 'user', content: 'hi'}, {role: 'assistant', content: arguments[0]}]}))", reply)
    page.refresh()
    page.wait(lambda: len(shown(page)) == 2)
    body = page.find_element("css selector", ".message.assistant .body")
    tags = page.execute_script("return [...arguments[0].querySelectorAll('*')].map(e => e.tagName.toLowerCase())", body)
    assert sorted(set(tags)) == ["a", "code", "em", "h1", "li", "p", "pre", "strong", "ul"]
    assert body.find_element("css selector", "pre code").text == "print('<script>alert(1)</script>')"
    assert body.find_element("css selector", "p code").text == "<b>code</b>"
    assert [a.get_attribute("href") for a in body.find_elements("css selector", "a")] == ["https://example.com/"]
    assert "[bad](javascript:window.pwned=3)" in body.text and HOSTILE in body.text
    assert page.execute_script("return window.pwned") is None
