"""The chat page at `/` of `ragblend serve`, as a person meets it: a real server process (a tiny random
model, so answers are words picked at random) and Debian's Chromium, headless, driven by Selenium.
Without chromium and chromium-driver installed the browser tests skip (`.ci/run` installs them)."""
from __future__ import annotations

import re
import shutil

import httpx
import pytest
from conftest import make_tiny_model_dir

from ragblend import RagBlend
from ragblend.serve.launch import ServerProcess

KEY = "page-key"
DOCS = [{"id": "lighthouse", "text": "The lighthouse of Varn was built in 1821 by the engineer Oda Pell."},
        {"id": "bridges", "text": "Oda Pell later designed three bridges over the river Am in Kessel."},
        {"id": "glass", "text": "Kessel is famous for its glass markets and its mayor Tomas Reh."}]
WAIT_S = 60  # every wait in a test is bounded


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm_dir, embedder):
    root = tmp_path_factory.mktemp("page")
    model = make_tiny_model_dir(root, "llama", smollm_dir)
    with RagBlend(root / "store", model=model, embedder=embedder) as rb:
        rb.add_documents(DOCS)
    server = ServerProcess(root / "store", "--model", str(model), api_key=KEY)
    yield server
    server.stop()


def test_the_page_is_served_without_a_key_and_stats_need_one(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>ragblend</title>" in page.text and "http" not in re.sub(r"<!--.*?-->", "", page.text, flags=re.S)
    assert httpx.get(server.url + "/v1/stats").status_code == 401
    with server.client() as client:
        stats = client.get("/v1/stats").json()
    assert stats["documents"] == len(DOCS) and stats["chunks"] >= len(DOCS) and stats["manifest"]["chunk_tokens"] > 0


# ---- in the browser --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    # The driver's path is given, so Selenium Manager never tries to download one.
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def wait_for(driver, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(lambda d: condition(d), message)


def by_id(driver, name: str):
    return driver.find_element("id", name)


def open_page(driver, server, key: str | None = KEY) -> None:
    """A fresh tab's state (no key remembered), then the key typed into the prompt."""
    driver.get(server.url + "/")
    driver.execute_script("sessionStorage.clear()")
    driver.get(server.url + "/")
    wait_for(driver, lambda d: by_id(d, "key-panel").is_displayed(), "the page did not ask for the API key")
    if key is not None:
        enter_key(driver, key)
        wait_for(driver, lambda d: by_id(d, "app").is_displayed(), "the right key did not open the chat")
        wait_for(driver, lambda d: stat(d, "documents") is not None, "the stats did not load")


def enter_key(driver, key: str) -> None:
    field = by_id(driver, "key")
    field.clear()
    field.send_keys(key + "\n")


def stat(driver, name: str) -> int | None:
    found = driver.find_elements("css selector", f'#stats dd[data-stat="{name}"]')
    return int(found[0].text.replace(",", "")) if found else None


def ask(driver, question: str, with_enter: bool = False) -> dict:
    """Send a question and wait for its answer to finish; the answer's parts as the page shows them."""
    turns = len(driver.find_elements("css selector", "#log > li"))
    box = by_id(driver, "question")
    box.send_keys(question)
    if with_enter:
        box.send_keys("\n")
    else:
        by_id(driver, "send").click()
    turn = f"#log > li:nth-child({turns + 1})"
    wait_for(driver, lambda d: d.find_elements("css selector", f"{turn} .details, {turn} .error"),
             f"no answer to {question!r}")
    errors = driver.find_elements("css selector", f"{turn} .error")
    assert not errors, errors[0].text
    return {"answer": driver.find_element("css selector", f"{turn} .answer").text,
            "numbers": driver.find_element("css selector", f"{turn} .numbers").text,
            "sources": [s.text for s in driver.find_elements("css selector", f"{turn} .source")],
            "session": by_id(driver, "session").text}


def count_answer_updates(driver) -> None:
    """From now on, window.answerUpdates counts the changes to answer text the page makes."""
    driver.execute_script("""
        window.answerUpdates = 0;
        new MutationObserver((records) => {
          window.answerUpdates += records.filter((r) => r.target.classList && r.target.classList.contains("answer")).length;
        }).observe(document.getElementById("log"), {subtree: true, childList: true});""")


def test_a_wrong_key_shows_an_error_and_the_right_one_opens_the_chat(browser, server):
    open_page(browser, server, key=None)
    assert not by_id(browser, "app").is_displayed()
    enter_key(browser, "not-the-key")
    wait_for(browser, lambda d: "wrong API key" in by_id(d, "key-error").text, "no error for a wrong key")
    assert not by_id(browser, "app").is_displayed()
    enter_key(browser, KEY)
    wait_for(browser, lambda d: by_id(d, "app").is_displayed(), "the right key did not open the chat")
    wait_for(browser, lambda d: stat(d, "documents") == len(DOCS), "the stats did not show the store")


def test_a_question_is_answered_as_a_stream_with_its_passages_and_the_next_turn_continues_it(browser, server,
                                                                                              tmp_path):
    open_page(browser, server)
    # The tiny random model answers only blanks greedily: sample, and keep answers short.
    for name, value in (("temperature", "1"), ("max-tokens", "12"), ("top-k", "2")):
        by_id(browser, name).clear()
        by_id(browser, name).send_keys(value)
    count_answer_updates(browser)
    first = ask(browser, "Who built the lighthouse of Varn?")
    assert first["answer"].strip()
    assert browser.execute_script("return window.answerUpdates") > 2  # shown piece by piece, as streamed
    assert len(first["sources"]) == 2 and all(re.match(r"(lighthouse|bridges|glass) · score 0\.\d{3}$", s)
                                              for s in first["sources"])
    assert re.search(r"mode blend · TTFT \d+ ms · tokens reused \d+ / recomputed \d+ · KV hits \d+ / misses \d+ · "
                     r"history \d+ tokens from \w+", first["numbers"])
    session = re.fullmatch(r"session (\S+) · 1 turn", first["session"]).group(1)

    second = ask(browser, "And what did he design later?", with_enter=True)  # Enter sends
    assert second["session"] == f"session {session} · 2 turns"
    history = [int(re.search(r"history (\d+) tokens", t["numbers"]).group(1)) for t in (first, second)]
    assert history[1] > history[0]  # the first turn is now history, reused as stored KV
    assert overflow_px(browser) <= 0
    browser.save_screenshot(str(tmp_path / "page.png"))  # the artifact: the page after two turns
    assert (tmp_path / "page.png").read_bytes()[:4] == b"\x89PNG"

    by_id(browser, "new-chat").click()
    assert browser.find_elements("css selector", "#log > li") == []
    assert by_id(browser, "session").text == "new conversation"
    assert browser.switch_to.active_element == by_id(browser, "question")


def test_an_uploaded_file_is_ingested_and_shows_in_the_stats(browser, server, tmp_path):
    open_page(browser, server)
    before = stat(browser, "documents")
    notes = tmp_path / "harbour.txt"
    notes.write_text("The harbour of Varn freezes every winter since the great frost of 1830.")
    by_id(browser, "files").send_keys(str(notes))
    browser.find_element("css selector", "#upload button[type=submit]").click()
    wait_for(browser, lambda d: "harbour.txt: 1 document added" in by_id(d, "upload-status").text,
             "the upload did not finish")
    wait_for(browser, lambda d: stat(d, "documents") == before + 1, "the stats did not count the upload")


def overflow_px(driver) -> int:
    return driver.execute_script("return document.documentElement.scrollWidth - document.documentElement.clientWidth")


def test_the_page_fits_a_desktop_and_a_phone_width_screen(browser, server):
    open_page(browser, server)
    assert overflow_px(browser) <= 0
    browser.set_window_size(390, 844)
    try:
        assert overflow_px(browser) <= 0
        assert by_id(browser, "question").size["width"] > 250  # the chat takes the width, the panels go below
    finally:
        browser.set_window_size(1280, 900)
