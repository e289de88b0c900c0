"""The app end to end in a real headless Chromium: every page renders over a workspace that one tiny-model
iteration filled, and a pair is audited from the keyboard on the Pairs page, landing in DuckDB.

    sudo apt-get install chromium chromium-driver  # once (Debian/Ubuntu); .ci/run does it in CI
    pytest tests/test_browser_e2e.py              # screenshots go to the test's tmp dir
    SELFRAT_SCREENSHOTS=docs/screenshots pytest tests/test_browser_e2e.py   # refresh the README's screens

The app runs as `selfrat app` in its own process (as a user starts it), so the test talks to it only through
the browser and reads the outcome back through `store.Store`, like any second process on the workspace.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip("needs `chromium` and `chromedriver` on PATH: on Debian/Ubuntu `sudo apt-get install chromium "
                "chromium-driver`", allow_module_level=True)

from selenium import webdriver  # noqa: E402  (the dev extra: a missing selenium fails, it does not skip)
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from engine.demo import demo_data_path  # noqa: E402
from store import Store  # noqa: E402

from helpers import cli, tiny_run_config  # noqa: E402

RUN_ID = "e2e"
# Sidebar title -> texts the page shows once its script has run over the fixture's data: its title and a
# section drawn late in the script (so the wait covers the whole page, not just the first element).
PAGES = {
    "Overview": ("Overview", f"Iterations of {RUN_ID}", "Pairs by review status"),
    "Judgments": ("Judgments", "Item", "Scores"),
    "Pairs": ("Pairs", "History"),
    "Launch": ("Launch", "Curation preview", "Job"),
    "Compare": ("Compare iterations", "Paired comparison (B - A)", "Rationales"),
    "Evaluation": ("Evaluation", "Judges", "Curation reports"),
}
ACCEPT_KEY = "a"  # ui/views/pairs.py: st.button("Accept", shortcut="a")
REVIEWER = "e2e-reviewer"
RENDER_TIMEOUT_S = 120  # an upper bound only (waits end as soon as the text shows): 2 shared cores get busy

# Never let Selenium Manager look for a driver online: the driver path is given explicitly below.
os.environ["SE_OFFLINE"] = "true"


# ------------------------------------------------------------------ workspace and app


@pytest.fixture(scope="module")
def e2e_workspace(tmp_path_factory, tiny_model_dir) -> Path:
    """The demo dataset plus one finished iteration (6 items x 3 samples) of the tiny random Llama: enough for
    judgments, curated pairs, metrics for two iterations and a checkpoint on every page."""
    tmp = tmp_path_factory.mktemp("e2e")
    ws = tmp / "ws"
    cli(ws, "import", demo_data_path(), "--dataset", "demo")
    # Sampling seed 3 (tiny_run_config's): these 6 items x 3 samples give auto pairs with min_margin 1.
    cfg = tiny_run_config(tiny_model_dir, eval_datasets=["demo"], iterations=1, max_train_items=6, max_eval_items=4)
    cfg_path = tmp / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cli(ws, "run", str(cfg_path), "--run-id", RUN_ID)
    assert Store.in_workspace(ws).pairs(RUN_ID, 1).height > 0, "the fixture run curated no pairs"
    return ws


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _selfrat() -> str:
    # The console script next to this interpreter (the venv's), not whatever `selfrat` is first on PATH.
    exe = Path(sys.executable).parent / "selfrat"
    return str(exe) if exe.exists() else shutil.which("selfrat")


@pytest.fixture(scope="module")
def app_url(e2e_workspace, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("app_log") / "app.log"
    env = {**os.environ, "SELFRAT_HOME": str(e2e_workspace)}
    with open(log, "wb") as out:
        # Own process group: `selfrat app` runs streamlit, which may start children; stop them all at the end.
        proc = subprocess.Popen([_selfrat(), "app", "--port", str(port), "--workspace", str(e2e_workspace)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`selfrat app` exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the app did not answer on {url} within 120 s:\n{log.read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


# ------------------------------------------------------------------ browser


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    # Root on a closed network: no sandbox, nothing that phones home, /tmp instead of a small /dev/shm.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="selfrat-chromium-")
    opts.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    # --window-size counts the window's frame; pin the page's viewport itself so screenshots are 1400x1000.
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": False})
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _lit(s: str) -> str:
    return f"'{s}'" if "'" not in s else f'"{s}"'


def _in_main(text: str) -> str:
    # Only the page body: the sidebar's navigation shows every page title all the time.
    return f'//*[@data-testid="stMain"]//*[not(self::script) and normalize-space(text())={_lit(text)}]'


def wait_rendered(driver, *texts: str, timeout: float = RENDER_TIMEOUT_S) -> None:
    """Until every text is visible and the script run is over: no 'Running' status widget and no stale
    (faded, left over from the previous run or page) elements."""
    wait = WebDriverWait(driver, timeout, poll_frequency=0.2)
    try:
        for text in texts:
            wait.until(EC.visibility_of_element_located((By.XPATH, _in_main(text))))
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]')
                   and not d.find_elements(By.CSS_SELECTOR, '[data-stale="true"]'))
    except TimeoutException:
        body = driver.find_element(By.TAG_NAME, "body").text
        raise AssertionError(f"{texts!r} never all rendered; the page shows:\n{body[:3000]}") from None
    exc = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
    assert not exc, f"the page raised:\n{exc[0].text}"


def open_page(driver, title: str) -> None:
    """Click the page's link in the sidebar navigation (what a user does), then wait for its content."""
    link = WebDriverWait(driver, RENDER_TIMEOUT_S).until(EC.element_to_be_clickable(
        (By.XPATH, f'//a[@data-testid="stSidebarNavLink"][.//p[normalize-space()={_lit(title)}]]')))
    link.click()
    wait_rendered(driver, *PAGES[title])


def screenshot(driver, name: str, out_dir: Path) -> Path:
    path = out_dir / f"{name.lower()}.png"
    assert driver.save_screenshot(str(path)), f"could not save {path}"
    extra = os.environ.get("SELFRAT_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / path.name)
    return path


# ------------------------------------------------------------------ tests


def test_every_page_renders(browser, app_url, tmp_path):
    browser.get(app_url + "/")
    wait_rendered(browser, *PAGES["Overview"])
    for title in PAGES:
        open_page(browser, title)
        shot = screenshot(browser, title, tmp_path)
        assert shot.stat().st_size > 10_000, f"{title}: the screenshot is (nearly) blank"


def test_pairs_accept_from_the_keyboard(browser, app_url, e2e_workspace):
    store = Store.in_workspace(e2e_workspace)
    assert store.audit_log(RUN_ID).height == 0
    total = store.pairs(RUN_ID, 1).height
    browser.get(app_url + "/")
    wait_rendered(browser, *PAGES["Overview"])
    open_page(browser, "Pairs")
    wait_rendered(browser, f"Pair 1 of {total}")
    # The caption under the heading names the pair on screen: "pair <id> · item <id> · status **auto** ...".
    caption = browser.find_element(By.XPATH, "//*[starts-with(normalize-space(.), 'pair ') and contains(., ' · item ')"
                                              " and not(*[starts-with(normalize-space(.), 'pair ')])]").text
    shown = int(caption.split()[1])

    # The reviewer's name from the sidebar goes into the audit row; Enter commits it (one rerun).
    who = browser.find_element(By.XPATH, '//*[@data-testid="stSidebar"]//input[@aria-label="Who"]')
    who.send_keys(Keys.CONTROL, "a")
    who.send_keys(REVIEWER, Keys.ENTER)
    wait_rendered(browser, f"Pair 1 of {total}")
    # Nothing focused that would swallow the key (shortcuts are ignored while typing in an input).
    browser.execute_script("document.activeElement && document.activeElement.blur()")
    ActionChains(browser).send_keys_to_element(browser.find_element(By.TAG_NAME, "body"), ACCEPT_KEY).perform()
    # The page confirms with the reviewer's name and steps on to the next pair.
    assert total > 1, "the fixture run should curate several pairs"
    wait_rendered(browser, f"accept (1 pair) by {REVIEWER}", f"Pair 2 of {total}")

    audit = store.audit_log(RUN_ID)
    assert audit.height == 1, "one key press, one audit row"
    row = audit.row(0, named=True)
    assert (row["action"], row["pair_id"], row["iteration"], row["who"]) == ("accept", shown, 1, REVIEWER)
    pairs = store.pairs(RUN_ID, 1)
    assert pairs.filter(pairs["pair_id"] == shown)["status"].to_list() == ["accepted"]
    assert (pairs["status"] == "accepted").sum() == 1
