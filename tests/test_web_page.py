"""The web page at ``/`` in a real browser: Debian's headless Chromium driven by Selenium (chromedriver),
against the Serve app on the session's local Ray (the plain app: no API key; the same deployed app as
tests/test_serve_resilience.py's, which may have run first: its killed replicas have been replaced).
Type a query, see the evidence passages (as soon as they are reranked: the page reads ``/v1/answer``'s
event stream) and then the answer, with sources and scores; on a phone-sized screen too. Screenshots go
to ``test-artifacts/`` (git-ignored).

The stream itself over the same app, through Serve's proxy: the events in order, and the same answer as
without ``stream`` (the HTTP layer's own stream tests: tests/test_serve_stream.py).

The browser tests are skipped when Chromium or chromedriver is missing (``scripts/setup.sh`` installs
them when run as root).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import httpx
import pytest

from test_serve import PLAIN_APP, PLAIN_OVERRIDES
from test_serve_stream import read_events, without_timings

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

HAS_BROWSER = Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()


@pytest.fixture(scope="module")
def base_url(serve_instance, serve_run_dir):
    """The plain app (no API key), shared with tests/test_serve_resilience.py."""
    return serve_instance.app(PLAIN_APP, serve_run_dir, PLAIN_OVERRIDES)


@pytest.fixture(scope="module")
def browser():
    if not HAS_BROWSER:
        pytest.skip("needs chromium and chromedriver (scripts/setup.sh installs them as root)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="re2g-chromium-")
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1280,1000"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def dev_query(tiny_sample):
    line = (tiny_sample / "tasks" / "slot_filling-dev-kilt.jsonl").open().readline()
    return json.loads(line)["input"]


# Records what the page shows at each change of the result section (a MutationObserver's callback runs
# after each task that changed it: one per event read from the stream).
RECORD_STATES = """
window.__states = [];
var result = document.getElementById("result"), answer = document.getElementById("answer");
new MutationObserver(function () {
  window.__states.push({state: result.dataset.state || "", shown: !result.classList.contains("hidden"),
                        passages: document.querySelectorAll("#passages .passage").length,
                        pending: answer.classList.contains("pending"), answer: answer.textContent,
                        weights: Array.prototype.map.call(document.querySelectorAll("#passages .p-weight .num"),
                                                          function (e) { return e.textContent; })});
}).observe(result, {subtree: true, childList: true, attributes: true, characterData: true});
"""


def ask(driver, base_url: str, query: str, timeout: float = 90, record: bool = False):
    """Load the page, ask ``query``, wait for the answer or an error (``record``: the states shown on the
    way, in ``window.__states``)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(base_url + "/")
    if record:
        driver.execute_script(RECORD_STATES)
    box = driver.find_element(By.ID, "query")
    box.clear()
    box.send_keys(query)
    driver.find_element(By.ID, "ask").click()
    WebDriverWait(driver, timeout).until(
        lambda d: d.find_element(By.ID, "result").get_attribute("data-state") == "answered"
        or d.find_element(By.ID, "error").is_displayed())


def test_page_shows_answer_and_evidence(browser, base_url, dev_query):
    from selenium.webdriver.common.by import By

    ask(browser, base_url, dev_query)
    assert not browser.find_element(By.ID, "error").is_displayed(), browser.find_element(By.ID, "error").text
    api = httpx.post(base_url + "/v1/answer", json={"query": dev_query}, timeout=60).json()

    answer = browser.find_element(By.ID, "answer").text
    assert answer == (api["answer"] or "(no answer)")
    cands = browser.find_elements(By.CSS_SELECTOR, "#candidates li")
    assert len(cands) == min(5, len(api["candidates"])) and all("%" in c.text for c in cands)
    chips = browser.find_element(By.ID, "timings").text
    for stage in ("retrieve", "rerank", "generate", "total"):
        assert stage in chips

    passages = browser.find_elements(By.CSS_SELECTOR, "#passages .passage")
    assert len(passages) == len(api["provenance"]) == 3
    for el, p in zip(passages, api["provenance"]):
        assert el.find_element(By.CSS_SELECTOR, ".p-title").text == p["title"]
        assert el.find_element(By.CSS_SELECTOR, ".src").text.lower() == p["source"]
        assert el.find_element(By.CSS_SELECTOR, ".p-text").text == p["text"].strip()
        assert f"rerank {p['rerank_score']:.2f}" in el.text and "weight" in el.text
        assert el.find_element(By.CSS_SELECTOR, ".pid").text == p["pid"]
    assert "Answered in" in browser.find_element(By.ID, "status").text

    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "web_page_desktop.png"))

    # a phone: 390 x 844 CSS pixels, touch, no horizontal scrolling
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
    try:
        ask(browser, base_url, dev_query)
        assert len(browser.find_elements(By.CSS_SELECTOR, "#passages .passage")) == 3
        assert browser.execute_script("return document.documentElement.scrollWidth") <= 390
        button = browser.find_element(By.ID, "ask")
        assert button.size["width"] > 300                 # full-width button on a narrow screen
        assert browser.save_screenshot(str(ARTIFACTS / "web_page_phone.png"))
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_page_shows_the_evidence_before_the_answer(browser, base_url, dev_query):
    """The reranked passages are on the page, the answer pending, before the answer arrives."""
    from selenium.webdriver.common.by import By

    ask(browser, base_url, dev_query, record=True)
    assert not browser.find_element(By.ID, "error").is_displayed(), browser.find_element(By.ID, "error").text
    states = browser.execute_script("return window.__states")
    answer = browser.find_element(By.ID, "answer").text
    evidence = [i for i, s in enumerate(states) if s["state"] == "evidence" and s["shown"] and s["passages"] == 3
                and s["pending"] and all(w == "weight …" for w in s["weights"])]
    answered = [i for i, s in enumerate(states) if s["state"] == "answered" and s["answer"] == answer]
    assert evidence and answered and evidence[0] < answered[0], states
    assert not any(s["pending"] for s in states[answered[0]:])
    assert all(w.startswith("weight ") and w.endswith("%") for w in states[-1]["weights"]), states[-1]


def test_stream_through_serve(base_url, dev_query):
    """``"stream": true`` through Serve's proxy: retrieved, reranked, answer, done, each when it exists;
    the answer event is the body the same request without stream gets."""
    with httpx.Client(base_url=base_url, timeout=60) as c:
        plain = c.post("/v1/answer", json={"query": dev_query})
        assert plain.status_code == 200, plain.text
        r, events, raw = read_events(c, {"query": dev_query})
        hits = c.post("/v1/retrieve", json={"query": dev_query}).json()["hits"]
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), raw
    assert [e[0] for e in events] == ["retrieved", "reranked", "answer", "done"], raw
    retrieved, reranked, answer = (e[1] for e in events[:3])
    times = [e[2] for e in events]
    print(f"\nstream through Serve: retrieved {times[0] * 1000:.0f} ms, reranked {times[1] * 1000:.0f} ms, "
          f"answer {times[2] * 1000:.0f} ms (server timings: {answer['timings']})")
    assert times == sorted(times)
    assert without_timings(answer) == without_timings(plain.json())
    assert [h["pid"] for h in retrieved["hits"]] == [h["pid"] for h in hits]
    assert [p["pid"] for p in reranked["passages"]] == [p["pid"] for p in answer["provenance"]]
    assert [p["rerank_score"] for p in reranked["passages"]] == [p["rerank_score"] for p in answer["provenance"]]
    assert events[3][1] == {"ok": True}


def test_page_shows_the_api_error(browser, base_url):
    from selenium.webdriver.common.by import By

    ask(browser, base_url, " ".join(["word"] * 300))      # over the query token limit: 422
    err = browser.find_element(By.ID, "error")
    assert err.is_displayed() and "tokens" in err.text and "limit" in err.text
    assert not browser.find_element(By.ID, "result").is_displayed()
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "web_page_error.png"))
