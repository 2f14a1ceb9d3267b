"""A new user's first look, in a real browser: headless Chromium (Debian's, driven by selenium
through Debian's chromedriver; never a downloaded one) against `tuner ui` on a study made by
the smoke run. Screenshots go to $TUNER_SCREENSHOTS (docs/ui.md's come from there), else to
the test's folder."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import write_fake_cifar
from .helpers import start, stored, tuner, ui_answers, wait_for_line, wait_until
from .servers import free_port

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
WAIT = 120  # seconds for the UI to show something, on a loaded machine

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="Debian's chromium and chromium-driver are not installed "
        "(apt-get install chromium chromium-driver)",
    ),
]
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The smoke study file, run as the README says (its first 4 trials: the baselines, which
    show every ending), on the real dev set where CI has it, else on data
    generated in its shape."""
    folder = tmp_path_factory.mktemp("smoke")
    (folder / "studies").mkdir()
    shutil.copy(ROOT / "studies" / "vgg-cifar-smoke.yaml", folder / "studies")
    real = os.environ.get("TUNER_CIFAR_DEV")
    data = Path(real) if real else write_fake_cifar(folder / "data", 1300, 2, 1000)
    for args in (("study", "create", "vgg-cifar-smoke"),
                 ("study", "run", "vgg-cifar-smoke", "--trials", "4")):  # fmt: skip
        done = tuner(folder, data, *args)
        assert done.returncode == 0, done.stdout + done.stderr
    return folder, data


@pytest.fixture(scope="module")
def ui(smoke: tuple[Path, Path]) -> Iterator[str]:
    """`tuner ui vgg-cifar-smoke`, serving; the URL it prints."""
    folder, data = smoke
    port = free_port()
    served = start(folder, data, "ui", "vgg-cifar-smoke", "--port", str(port))
    try:
        lines = wait_for_line(served, r"open http://")
        url = re.search(r"open (\S+)", lines[-1]).group(1)  # type: ignore[union-attr]

        wait_until(lambda: ui_answers(port), "the UI to answer")
        yield url
    finally:
        served.send_signal(signal.SIGINT)  # as Ctrl-C: the server and its workers stop
        try:
            served.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            served.kill()
            served.communicate()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1600,1000"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("TUNER_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _text(driver: webdriver.Chrome) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def _shows(driver: webdriver.Chrome, *texts: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT).until(lambda d: all(t in _text(d) for t in texts))


def _names(folder: Path) -> dict[int, str]:
    """Each trial's run name, as tuner gave it (from the MLflow store)."""
    from .helpers import trial_runs

    return {n: r.info.run_name for n, r in trial_runs(folder, "vgg-cifar-smoke").items()}


def _close_assistant(driver: webdriver.Chrome) -> None:
    """MLflow 3.17 opens its assistant beside the page on a first visit: closed, as a user
    would."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label=Close]"):
        if button.is_displayed():
            button.click()


def test_the_ui_opens_on_the_trials_best_first_by_their_readable_names(
    smoke, ui: str, browser, shots: Path
) -> None:
    from selenium.webdriver.common.by import By

    folder, _ = smoke
    names = _names(folder)
    study = stored(folder, "vgg-cifar-smoke")
    best = max((t for t in study.trials if t.value is not None and t.state.name == "COMPLETE"),
               key=lambda t: t.value)  # fmt: skip
    browser.get(ui)
    _shows(browser, *names.values())
    _close_assistant(browser)
    text = _text(browser)
    assert "Model training" in text and "Detect Issues" not in text
    assert "0001 vgg11-no-bn sgd [lr-too-high] [diverged]" in text and "[pruned]" in text
    for column in ("objective", "best_val_acc", "epochs_trained", "state", "depth", "optimizer"):
        assert column in text, f"the {column} column is shown"
    links = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "a[href*='/runs/']")]
    shown = [t for t in links if re.match(r"\d{4} ", t)]
    assert shown[0] == names[best.number], "best first, by objective"
    browser.save_screenshot(str(shots / "ui-trials.png"))


def test_the_parent_run_holds_its_trials_and_a_trial_page_shows_val_acc(
    smoke, ui: str, browser, shots: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    folder, _ = smoke
    names = _names(folder)
    browser.get(ui)
    _shows(browser, names[0])
    _close_assistant(browser)
    # MLflow's own view: the study's parent run, its trial runs nested under it
    browser.find_element(By.XPATH, "//button[normalize-space()='Exit shared view']").click()
    _shows(browser, "vgg-cifar-smoke")
    expand = browser.find_elements(
        By.CSS_SELECTOR, "button[data-component-id$='runnamecellrenderer.tsx_46']"
    )
    assert expand, "the parent run can be expanded"
    expand[0].click()
    _shows(browser, *names.values())
    browser.save_screenshot(str(shots / "ui-parent.png"))

    browser.find_element(By.LINK_TEXT, names[0]).click()
    _shows(browser, "Model metrics")
    tab = "//*[normalize-space()='Model metrics' and @role='tab']"
    browser.find_element(By.XPATH, tab).click()
    search = browser.find_element(By.CSS_SELECTOR, "input[placeholder='Search metric charts']")
    search.send_keys("val_acc", Keys.ENTER)
    _shows(browser, "val_acc")  # somewhere on the page: the chart's card may come later
    chart = "//*[normalize-space()='val_acc']"
    WebDriverWait(browser, WAIT).until(lambda b: b.find_elements(By.XPATH, chart),
                                     "a chart titled val_acc")  # fmt: skip
    # the charts are plotly's, drawn a moment after their cards
    WebDriverWait(browser, WAIT).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot, svg.main-svg")
    )
    browser.save_screenshot(str(shots / "ui-trial-val-acc.png"))


def test_the_parent_run_shows_the_studys_pictures(smoke, ui: str, browser, shots: Path) -> None:
    from selenium.webdriver.common.by import By

    folder, _ = smoke
    study = stored(folder, "vgg-cifar-smoke")
    parent = study.user_attrs["mlflow_parent_run_id"]
    experiment = study.user_attrs["mlflow_experiment_id"]
    base = ui.split("/#/")[0]
    browser.get(f"{base}/#/experiments/{experiment}/runs/{parent}/artifacts")
    _shows(browser, "plots")
    browser.find_element(By.XPATH, "//*[normalize-space()='plots']").click()
    _shows(browser, "timeline.png", "intermediate_values.png", "param_importances.png")
    browser.find_element(By.XPATH, "//*[normalize-space()='timeline.png']").click()
    from selenium.webdriver.support.ui import WebDriverWait

    widths = "return [...document.images].map(i => i.naturalWidth)"
    # the picture itself, drawn (about 1,000 pixels wide), not a broken link
    WebDriverWait(browser, WAIT).until(lambda d: max(d.execute_script(widths) or [0]) > 500)
    browser.save_screenshot(str(shots / "ui-parent-pictures.png"))
