"""End to end in a browser: the pipeline on the embedded broker, the portal, and headless Chromium.

Frames go through the five stages (``broker stage``, as in ``tests/streams/test_pipeline.py``) until
the archive holds alerts; the portal serves them under uvicorn; Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium) opens the live page, a NEW frame is published, and its
alerts must appear on the open page through the live stream. Then the object page draws a light
curve, and a label given with a key on the vetting page must be stored with who, when and the
model version. Skipped, with the reason, where Chromium, its driver or Selenium is missing.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest

from broker.archive.reader import Archive
from broker.frame import encode_fits
from broker.vetting import LabelStore
from streams import topics
from streams.demo import start_stages, stop_stages, wait_until_drained
from streams.framestore import FrameStore
from streams.producer import FrameProducer
from streams.stages import pipeline_topics
from streams.web.config import WebConfig
from tests.streams.test_pipeline import SIM, _frames
from tests.streams.web.test_live import running_server

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: Chromium without a display, a sandbox, a GPU, or any network of its own (updates, sync, first run).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1440,1000",
         "--hide-scrollbars")


def browser_missing() -> str | None:
    """Why the browser test cannot run here (None when it can)."""
    if not CHROMIUM.is_file() and shutil.which("chromium") is None:
        return "Chromium is not installed (Debian package chromium)"
    if not CHROMEDRIVER.is_file() and shutil.which("chromedriver") is None:
        return "chromedriver is not installed (Debian package chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


def chromium(user_data_dir: Path):
    """A headless Chromium of a fresh profile, driven by Selenium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in (*FLAGS, f"--user-data-dir={user_data_dir}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, CSP refusals included
    options.binary_location = str(CHROMIUM if CHROMIUM.is_file() else shutil.which("chromium"))
    driver_path = str(CHROMEDRIVER if CHROMEDRIVER.is_file() else shutil.which("chromedriver"))
    return webdriver.Chrome(service=Service(driver_path), options=options)


@pytest.fixture
def browser():
    why = browser_missing()
    if why:
        pytest.skip(f"browser test skipped: {why}")
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        driver = chromium(Path(profile))
        driver.set_page_load_timeout(60)
        try:
            yield driver
        finally:
            driver.quit()


@pytest.fixture
def pipeline(tmp_path):
    """(settings, workdir, producer, running stage processes) of a pipeline on a broker of its own."""
    from streams.embedded import EmbeddedKafka
    from streams.settings import KafkaSettings

    with EmbeddedKafka() as kafka:
        settings = KafkaSettings(kafka.bootstrap, app_id="browser-test")
        topics.create_topics(settings.bootstrap, pipeline_topics(SIM.filters))
        procs = start_stages(settings.bootstrap, settings.app_id, tmp_path)
        try:
            producer = FrameProducer(settings, FrameStore(str(tmp_path / "frames")), 8 << 20, 1 << 30)
            yield settings, tmp_path, producer, procs
        finally:
            stop_stages(procs)


def _until(condition, timeout: float, what: str, driver=None, shot: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            if driver is not None and shot is not None:
                driver.save_screenshot(str(shot))
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.25)


def _card_ids(driver) -> set[str]:
    return set(driver.execute_script(
        "return [...document.querySelectorAll('#cards .card')].map(c => c.dataset.alertId)"))


def test_a_new_alert_appears_live_and_a_key_press_stores_a_label(browser, pipeline, tmp_path):
    from selenium.webdriver.common.by import By

    settings, workdir, producer, procs = pipeline
    frames = _frames(5)  # epochs 0-2 build the reference; 3 is subtracted now, 4 once the page is open
    for frame, _ in frames[:4]:
        producer.publish_frame(frame, time.time())
    producer.flush()
    wait_until_drained(settings, procs, timeout=600)

    config = WebConfig.for_state_dir(workdir / "state", tokens_path=tmp_path / "tokens.sqlite",
                                     labels_path=tmp_path / "labels.sqlite", bootstrap=settings.bootstrap)
    with running_server(config) as base:
        # the live page: the archived alerts, and the stream connected
        browser.get(f"{base}/")
        before = _until(lambda: _card_ids(browser), 60, "the archived alerts on the live page", browser,
                        tmp_path / "live-archived.png")
        _until(lambda: browser.find_element(By.ID, "streamstate").text == "live", 60, "the live stream", browser,
               tmp_path / "live-stream.png")

        # a new frame, published after the page loaded: its alerts arrive on the open page
        producer.publish_frame(frames[4][0], time.time())
        producer.flush()
        fresh = _until(lambda: _card_ids(browser) - before, 300, "a new alert on the live page", browser,
                       tmp_path / "live-new.png")
        card = browser.find_element(By.CSS_SELECTOR, f'.card[data-alert-id="{sorted(fresh)[0]}"]')
        assert "fresh" in card.get_attribute("class")
        assert "arrived live" in browser.find_element(By.ID, "stats").text
        _until(lambda: browser.execute_script(
            "return [...arguments[0].querySelectorAll('.triplet img')].every(i => i.complete && i.naturalWidth > 0)",
            card), 90, "the new alert's cutouts (archived up to a batch after it is seen)")

        object_href = card.find_element(By.CSS_SELECTOR, "a.obj").get_attribute("href")

        # the filter box: an expression no alert passes empties the page, one that does not parse says why
        box = browser.find_element(By.ID, "filter")
        box.send_keys("rb > 2\n")
        _until(lambda: not _card_ids(browser) and "rb+%3E+2" in browser.current_url, 30, "the filtered page")
        box.clear()
        box.send_keys("rb >\n")
        _until(lambda: browser.find_element(By.ID, "filtererror").text, 30, "the filter's error")
        assert "filter" in browser.find_element(By.ID, "filtererror").text

        # its object: a light curve drawn as SVG with a point per detection
        browser.get(object_href)
        _until(lambda: browser.find_elements(By.CSS_SELECTOR, ".lightcurve svg .detection"), 30,
               "the light curve", browser, tmp_path / "object.png")

        # a malformed escape in the URL stopped the page at "loading" (decodeURIComponent threw): now the API says
        browser.get(f"{base}/objects/OBJ100%")
        _until(lambda: "OBJ100%" in "".join(e.text for e in browser.find_elements(By.CSS_SELECTOR, "p.error")), 30,
               "the object page's error for a malformed URL", browser, tmp_path / "object-malformed.png")

        # vetting: a token with scope vet, then the key r labels the candidate shown
        clear = _vet_token(config)
        browser.get(f"{base}/vet")
        browser.execute_script("localStorage.setItem('broker.portal.token', arguments[0])", clear)
        browser.get(f"{base}/vet")
        shown = _until(lambda: browser.find_elements(By.CSS_SELECTOR, "#current[data-alert-id]"), 30,
                       "a candidate to vet", browser, tmp_path / "vet.png")[0].get_attribute("data-alert-id")
        browser.find_element(By.TAG_NAME, "body").send_keys("r")
        _until(lambda: config.labels_path.is_file() and LabelStore(config.labels_path).realbogus(), 30,
               "the label in the database", browser, tmp_path / "vet-label.png")
        _until(lambda: browser.find_element(By.ID, "current").get_attribute("data-alert-id") != shown, 30,
               "the next candidate")
        browser.get("about:blank")  # close the live stream before the server stops
    with LabelStore(config.labels_path) as store:
        (label,) = store.realbogus()
    assert (str(label.alert_id), label.label, label.who) == (shown, "real", "vetter")
    assert label.model_version.startswith("realbogus") and label.score is not None and label.at > time.time() - 600


def test_the_api_page_lists_the_endpoints_and_calls_one(browser, tmp_path):
    """Swagger UI under the portal's CSP: it renders, sends a request with the stored token, loads nothing else."""
    from selenium.webdriver.common.by import By

    config = WebConfig.for_state_dir(tmp_path)
    with running_server(config) as base:
        browser.get(f"{base}/docs")
        browser.execute_script("localStorage.setItem('broker.portal.token', 'tok.secret')")
        browser.refresh()
        ops = _until(lambda: browser.find_elements(By.CSS_SELECTOR, ".opblock"), 60, "the operations",
                     browser, tmp_path / "docs.png")
        paths = {p.get_attribute("data-path") for p in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
        assert len(ops) >= 10 and {"/api/v1/health", "/api/v1/cone", "/api/v1/frames"} <= paths, paths
        health = [o for o in ops if "/api/v1/health" in o.text][0]
        health.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
        _until(lambda: health.find_elements(By.CSS_SELECTOR, ".try-out__btn"), 10, "Try it out").pop().click()
        _until(lambda: health.find_elements(By.CSS_SELECTOR, ".execute"), 10, "Execute").pop().click()
        status = _until(lambda: [c.text for c in health.find_elements(By.CSS_SELECTOR, ".live-responses-table "
                                                                       ".response-col_status") if c.text.isdigit()],
                        20, "the response", browser, tmp_path / "docs-response.png")
        assert status[0] == "200", status
        curl = health.find_element(By.CSS_SELECTOR, ".curl-command").text
        assert "Authorization: Bearer tok.secret" in curl, curl  # the portal's stored token goes with it
        loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        elsewhere = [u for u in loaded if not u.startswith((base, "data:"))]  # data: icons are inline, not loads
        assert loaded and not elsewhere, elsewhere
        refused = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
        assert not refused, refused


def test_a_frame_uploaded_on_the_upload_page_comes_back_with_its_candidates(browser, tmp_path):
    """The upload page: a frame and its reference chosen in the form, the candidates and their cutouts shown."""
    from selenium.webdriver.common.by import By

    from streams.web.tokens import TokenStore
    from tests.streams.web.test_upload import exposure

    science = exposure(2, "TEST-F1-r-0001", 60000.5, transient=(100.3, 150.7, 30000.0))
    (tmp_path / "science.fits").write_bytes(encode_fits(science))
    (tmp_path / "reference.fits").write_bytes(encode_fits(exposure(1, "TEST-F1-r-0000", 60000.4)))
    config = WebConfig.for_state_dir(tmp_path / "state", tokens_path=tmp_path / "tokens.sqlite")
    store = TokenStore(config.tokens_path)
    clear = store.add("observer", ["read", "upload"])
    store.close()
    with running_server(config) as base:
        browser.get(f"{base}/upload")
        browser.execute_script("localStorage.setItem('broker.portal.token', arguments[0])", clear)
        browser.get(f"{base}/upload")
        browser.find_element(By.ID, "framefile").send_keys(str(tmp_path / "science.fits"))
        browser.find_element(By.ID, "referencefile").send_keys(str(tmp_path / "reference.fits"))
        browser.find_element(By.ID, "send").click()
        rows = _until(lambda: browser.find_elements(By.CSS_SELECTOR, "#candidates tr.candidate"), 120,
                      "the candidates", browser, tmp_path / "upload.png")
        assert "SUBTRACTED" in browser.find_element(By.ID, "summary").text
        first = rows[0].text
        assert "100.3, 150.7" in first, first
        _until(lambda: browser.execute_script(
            "return [...arguments[0].querySelectorAll('img')].length === 3 && "
            "[...arguments[0].querySelectorAll('img')].every(i => i.complete && i.naturalWidth === 63)", rows[0]),
            30, "the three cutouts of the best candidate")
        refused = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
        assert not refused, refused


def test_a_watchlist_pasted_on_its_page_lists_the_alerts_near_each_target(browser, tmp_path):
    """The watchlist page: a pasted list matched against the archive, each row linking its object; a bad row named."""
    from selenium.webdriver.common.by import By

    from tests.streams.web.conftest import build_state
    from tests.streams.web.test_watchlists import WATCHLIST

    build_state(tmp_path / "state")
    with running_server(WebConfig.for_state_dir(tmp_path / "state", tokens_path=tmp_path / "tokens.sqlite")) as base:
        browser.get(f"{base}/watchlist")
        browser.find_element(By.ID, "watchtext").send_keys(WATCHLIST)
        browser.find_element(By.ID, "match").click()
        rows = _until(lambda: browser.find_elements(By.CSS_SELECTOR, "#matchtable tr.match"), 30, "the matches",
                      browser, tmp_path / "watchlist.png")
        assert [r.find_element(By.TAG_NAME, "td").text for r in rows] == ["host"] * 3 + ["neighbour"]
        assert browser.find_element(By.ID, "watchsummary").text.startswith("4 alert(s) near 2 of 3 target(s)")
        link = rows[0].find_element(By.CSS_SELECTOR, "a").get_attribute("href")
        assert link.startswith(f"{base}/objects/OBJ"), link
        box = browser.find_element(By.ID, "watchtext")
        box.clear()
        box.send_keys("name,ra,dec\nfar,10,95\n")
        browser.find_element(By.ID, "match").click()
        _until(lambda: "row 2, dec: 95 deg is outside" in browser.find_element(By.ID, "watchstate").text, 30,
               "the bad row named", browser, tmp_path / "watchlist-bad.png")
        assert not browser.find_elements(By.CSS_SELECTOR, "#matchtable tr.match")
        refused = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
        assert not refused, refused


def test_a_watchlist_saved_on_its_page_is_listed_matched_loaded_and_deleted(browser, tmp_path):
    """The watchlist page with a token: the pasted list saved by name, its matches shown, loaded back, deleted."""
    from selenium.webdriver.common.by import By

    from tests.streams.web.conftest import build_state
    from tests.streams.web.test_watchlists import WATCHLIST

    build_state(tmp_path / "state")
    config = WebConfig.for_state_dir(tmp_path / "state", tokens_path=tmp_path / "tokens.sqlite")
    clear = _vet_token(config)
    with running_server(config) as base:
        browser.get(f"{base}/watchlist")
        assert not browser.find_element(By.ID, "saveform").is_displayed()  # no token: nothing to save under
        browser.execute_script("localStorage.setItem('broker.portal.token', arguments[0])", clear)
        browser.get(f"{base}/watchlist")
        _until(lambda: "No saved watchlist yet" in browser.find_element(By.ID, "savedlists").text, 30,
               "the empty list of saved watchlists", browser, tmp_path / "saved-empty.png")
        browser.find_element(By.ID, "watchtext").send_keys(WATCHLIST)
        browser.find_element(By.ID, "savename").send_keys("hosts")
        browser.find_element(By.ID, "save").click()
        rows = _until(lambda: browser.find_elements(By.CSS_SELECTOR, "#savedtable tr.saved"), 30, "the saved list",
                      browser, tmp_path / "saved.png")
        assert rows[0].text.startswith("hosts 3 ") and "3 target(s) saved as hosts" in browser.find_element(
            By.ID, "savedstate").text
        browser.find_element(By.ID, "watchtext").clear()
        rows[0].find_element(By.XPATH, ".//button[text()='matches']").click()
        matches = _until(lambda: browser.find_elements(By.CSS_SELECTOR, "#matchtable tr.match"), 30,
                         "the saved list's matches", browser, tmp_path / "saved-matches.png")
        assert [r.find_element(By.TAG_NAME, "td").text for r in matches] == ["host"] * 3 + ["neighbour"]
        assert "of the saved list hosts" in browser.find_element(By.ID, "watchsummary").text
        rows[0].find_element(By.XPATH, ".//button[text()='load']").click()
        _until(lambda: "neighbour" in browser.find_element(By.ID, "watchtext").get_property("value"), 30,
               "the saved list loaded into the form", browser, tmp_path / "saved-load.png")
        browser.find_element(By.XPATH, "//tr[@class='saved']//button[text()='delete']").click()
        browser.switch_to.alert.accept()
        _until(lambda: "hosts deleted" in browser.find_element(By.ID, "savedstate").text, 30, "the list deleted",
               browser, tmp_path / "saved-deleted.png")
        assert not browser.find_elements(By.CSS_SELECTOR, "#savedtable tr.saved")
        refused = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
        assert not refused, refused


def _vet_token(config: WebConfig) -> str:
    from streams.web.tokens import TokenStore

    store = TokenStore(config.tokens_path)
    try:
        return store.add("vetter", ["read", "vet"])
    finally:
        store.close()


# --- the screenshots of docs/portal.md ------------------------------------------------------------
def _shoot(driver, path: Path, height: int = 1000) -> None:
    driver.set_window_size(1440, height)
    time.sleep(1.5)
    driver.save_screenshot(str(path))


def shoot_watchlist(driver, base: str, state_dir: Path, out: Path) -> None:
    """docs/portal-watchlist.png: the positions of three of the archive's objects, and an empty patch, matched."""
    from selenium.webdriver.common.by import By

    rows = Archive(state_dir / "archive").query(
        "SELECT object_id, avg(ra) AS ra, avg(dec) AS dec FROM alerts GROUP BY object_id "
        "ORDER BY count(*) DESC, object_id LIMIT 3").to_pylist()
    text = "name,ra,dec,radius\n" + "".join(f"target-{i + 1},{r['ra']:.6f},{r['dec']:.6f},3\n"
                                             for i, r in enumerate(rows)) + "empty,10:00:00,-40:00:00,60\n"
    driver.get(f"{base}/watchlist")
    driver.find_element(By.ID, "watchtext").send_keys(text)
    driver.find_element(By.ID, "match").click()
    _until(lambda: driver.find_elements(By.CSS_SELECTOR, "#matchtable tr.match"), 60, "the matches")
    _shoot(driver, out / "portal-watchlist.png")


def take_screenshots(state_dir: Path, out: Path, object_id: str, frame_id: str) -> None:
    """Take docs/portal-*.png over a pipeline's state folder (the demo's).

    The live page with alerts arriving, night mode, an object, a frame and the vetting page after
    four labels; tokens and labels go to a temporary folder, the state is only read.

    The live page's new alerts are the archive's first night replayed (``broker replay``) to a topic of an
    embedded broker that the portal streams: older than the 60 the page loads, they arrive as new ones.
    """
    import subprocess
    import sys

    from selenium.webdriver.common.by import By

    from streams.embedded import EmbeddedKafka
    from streams.topics import TopicSpec, create_topics
    from streams.web.tokens import TokenStore

    night = Archive(state_dir / "archive").query("SELECT min(night) FROM alerts").column(0).to_pylist()[0]
    with tempfile.TemporaryDirectory() as work, EmbeddedKafka() as kafka:
        create_topics(kafka.bootstrap, [TopicSpec("alerts.live")])
        config = WebConfig.for_state_dir(state_dir, tokens_path=Path(work) / "tokens.sqlite",
                                         labels_path=Path(work) / "labels.sqlite", bootstrap=kafka.bootstrap,
                                         alerts_topic="alerts.live")
        tokens = TokenStore(config.tokens_path)
        clear = tokens.add("ana", ["read", "vet"])
        tokens.close()
        with running_server(config) as base:
            driver = chromium(Path(work) / "profile")
            try:
                driver.get(f"{base}/")
                _until(lambda: driver.find_element(By.ID, "streamstate").text == "live", 60, "the live stream")
                subprocess.run([sys.executable, "-m", "streams.cli", "replay", "--topic", "alerts.live", "--bootstrap",
                                kafka.bootstrap, "--state-dir", str(state_dir), "--where",
                                f"night = '{night}' AND rb > 0.9 AND snr > 15"], check=True, capture_output=True)
                _until(lambda: driver.find_elements(By.CSS_SELECTOR, ".card.fresh"), 60, "the replayed alerts")
                time.sleep(6)  # their cutouts, and the arrival highlight fading
                _shoot(driver, out / "portal-live.png")
                driver.find_element(By.ID, "night").click()
                _shoot(driver, out / "portal-night.png")
                driver.find_element(By.ID, "night").click()
                driver.get(f"{base}/objects/{object_id}")
                time.sleep(2)
                _shoot(driver, out / "portal-object.png", 1180)
                driver.get(f"{base}/frames/{frame_id}")
                time.sleep(3)
                _shoot(driver, out / "portal-frame.png", 1180)
                driver.execute_script("localStorage.setItem('broker.portal.token', arguments[0])", clear)
                driver.get(f"{base}/vet")
                time.sleep(3)
                for key in "rbri":
                    driver.find_element(By.TAG_NAME, "body").send_keys(key)
                    time.sleep(1.5)
                _shoot(driver, out / "portal-vet.png")
                shoot_watchlist(driver, base, state_dir, out)
                driver.get("about:blank")
            finally:
                driver.quit()


if __name__ == "__main__":  # python -m tests.streams.web.test_browser var/demo/state docs OBJECT_ID FRAME_ID
    import sys

    take_screenshots(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4])
