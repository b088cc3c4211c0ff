"""A real headless Chromium against a real Airflow API server, for the browser tests.

Fixtures (registered in ``conftest.py``, so any test module can ask for them):

- ``airflow_ui`` (module): a ``LocalAirflow`` with its API server and DAG processor, the DAG
  ``fraud_nightly`` parsed, the repository's plugins loaded. Its ``url``, ``api()`` and
  ``dag_runs()`` are there to check through the REST API what the browser did.
- ``chromium`` (module): a Playwright ``BrowserContext`` of Debian's Chromium (``/usr/bin/chromium``,
  or ``$FRAUD_CHROMIUM``), headless, with a fresh profile. Every Chromium process it started is
  gone when the module ends, whatever the tests did.
- ``logged_in_page`` (module): a page of that browser signed in through the UI's login form as
  the admin user; tests navigate it where they need (``page.goto(airflow_ui.url + "/...")``).
- ``screenshot`` (function): ``screenshot("step")`` saves the page (or ``screenshot("step", locator)``
  one element) as ``test-artifacts/browser/<module>/<test>/NN-step.png`` and prints the path; the
  test's last state is saved as well when the test ends, passed or not.

A module that needs a server of its own (another lake, other settings) defines its own
module-scoped ``airflow_ui`` fixture returning a started ``LocalAirflow``: ``logged_in_page`` then
signs in to that one.

The screenshots stay after the run (``test-artifacts/`` is ignored by git); the folder of a test
is emptied when that test starts again.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts" / "browser"
CHROMIUM = "/usr/bin/chromium"
# Headless on a machine without a display or a network: no sandbox (root in CI), no GPU, nothing
# fetched in the background (component updates, safe browsing lists).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
VIEWPORT = {"width": 1440, "height": 1800}  # tall enough for the whole trigger dialog in one screenshot
TIMEOUT_MS = 60_000  # an action (click, fill, navigation): the API server shares two cores with another test worker
EXPECT_TIMEOUT_MS = 30_000  # an assertion on the page (Playwright waits 5 s by default)

INSTALL_HINT = (
    "The browser tests drive Debian's Chromium: install it with "
    "`sudo apt-get install chromium` (.ci/run does this in CI), or point FRAUD_CHROMIUM at a "
    "recent Chromium or Chrome binary."
)


def chromium_executable() -> str:
    """The Chromium binary the tests launch; fails the test, saying what to install, when absent."""
    path = os.environ.get("FRAUD_CHROMIUM") or CHROMIUM
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(f"Chromium not found at {path}. {INSTALL_HINT}", pytrace=False)
    return path


def browser_processes(folder: Path) -> list:
    """Live Chromium processes of the browser launched on ``folder``: those that name the folder on
    their command line (the browser, its crash handler, which detaches itself) and their children."""
    import psutil  # an Airflow dependency

    def alive(proc) -> bool:
        return "chrom" in proc.name().lower() and proc.status() != psutil.STATUS_ZOMBIE

    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if alive(proc) and any(str(folder) in arg for arg in proc.info["cmdline"] or ()):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        if alive(child):
                            found[child.pid] = child
    return list(found.values())


def _end_browser_processes(folder: Path, seen: list) -> list[int]:
    """Give the processes of the browser on ``folder`` (``seen`` as it was closed, and any still
    found) a few seconds to exit, then kill the rest; their pids."""
    import psutil

    procs = {p.pid: p for p in [*seen, *browser_processes(folder)]}
    alive = []
    for proc in procs.values():
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    _, alive = psutil.wait_procs(alive, timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)
    return [p.pid for p in alive]


@contextlib.contextmanager
def launch_chromium(folder: Path, executable: str | None = None) -> Iterator:
    """A headless Chromium whose profile, configuration and cache are fresh folders in ``folder``;
    yields its BrowserContext.

    On the way out (an exception included) the browser is closed, Playwright's driver stopped, and
    any process of that browser still alive is killed."""
    executable = executable or chromium_executable()
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: `make venv` installs the pinned requirements.", pytrace=False)
    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    shutil.rmtree(folder, ignore_errors=True)
    for sub in ("profile", "config", "cache"):
        (folder / sub).mkdir(parents=True)
    # XDG folders: Chromium's own state (its crash handler's database among it) stays in the
    # folder too, not in the user's ~/.config/chromium, and names the folder on its command line
    env = {**os.environ, "XDG_CONFIG_HOME": str(folder / "config"), "XDG_CACHE_HOME": str(folder / "cache")}
    seen: list = []  # the browser's processes as it is closed
    playwright = sync_playwright().start()
    try:
        context = playwright.chromium.launch_persistent_context(
            str(folder / "profile"),
            executable_path=executable,
            headless=True,
            args=CHROMIUM_ARGS,
            env=env,
            viewport=VIEWPORT,
            locale="en-US",
            timezone_id="UTC",
        )
        try:
            context.set_default_timeout(TIMEOUT_MS)
            yield context
        finally:
            seen.extend(browser_processes(folder))
            with contextlib.suppress(Exception):  # a crashed browser is closed already
                context.close()
    finally:
        try:
            playwright.stop()
        finally:
            _end_browser_processes(folder, seen)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:80] or "step"


class Screenshots:
    """Numbered screenshots of one page in one folder: ``shots("step")`` -> ``NN-step.png``."""

    def __init__(self, page, folder: Path):
        self.page = page
        self.folder = folder
        self.count = 0
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)

    def __call__(self, step: str, target=None) -> Path:
        """Save the page's viewport, or ``target`` (a Locator) alone; print and return the path."""
        self.count += 1
        path = self.folder / f"{self.count:02d}-{_slug(step)}.png"
        (target if target is not None else self.page).screenshot(path=str(path))
        print(f"screenshot: {path.relative_to(REPO)}")
        return path


def sign_in(page, url: str, user: str, password: str, shots: Screenshots) -> None:
    """Sign in through the UI's login form as a person would: open the UI, land on the form, type, submit."""
    from playwright.sync_api import expect

    page.goto(f"{url}/")
    expect(page).to_have_url(re.compile(r"/auth/login"))
    expect(page.get_by_role("heading", name="Sign into Airflow")).to_be_visible()
    page.get_by_label("Username").fill(user)
    page.get_by_label("Password").fill(password)
    shots("login-form-filled")
    page.get_by_role("button", name="Sign in").click()
    expect(page).not_to_have_url(re.compile(r"/auth/login"))
    expect(page.get_by_role("link", name="Dags", exact=True)).to_be_visible()  # not "Failed Dags" etc. of the dashboard
    shots("signed-in")


# --- fixtures ----------------------------------------------------------------------------------


@contextlib.contextmanager
def api_server(home: Path, lake_uri: str, env: dict[str, str] | None = None) -> Iterator:
    """An API server and a DAG processor of this repository's DAGs and plugins (no scheduler), the
    DAG parsed; stopped on the way out. Sensors poke rarely, so a run created meanwhile stays queued."""
    sys.path.insert(0, str(REPO / "deploy"))
    from local_airflow import LocalAirflow

    af = LocalAirflow(home, lake_uri, extra_env={**(env or {}), "FRAUD_POKE_SECONDS": "600"})
    af.init()
    af.start("api-server", "dag-processor")
    try:
        af.wait_ready()
        af.wait_for_dag("fraud_nightly")
        yield af
    finally:
        af.stop()


@pytest.fixture(scope="module")
def airflow_ui(tmp_path_factory):
    """An API server and a DAG processor of this repository's DAGs and plugins, no scheduler."""
    home = tmp_path_factory.mktemp("airflow-ui")
    with api_server(home, (home / "lake").as_uri()) as af:
        yield af


@pytest.fixture(scope="module")
def chromium(request, tmp_path_factory):
    """The module's headless Chromium (a Playwright BrowserContext), closed when the module ends."""
    executable = chromium_executable()  # before Airflow starts: a missing browser fails at once
    with launch_chromium(tmp_path_factory.mktemp("chromium"), executable) as context:
        yield context


@pytest.fixture(scope="module")
def logged_in_page(request, chromium, airflow_ui):
    """A page signed in to the API server's UI through its login form (as the admin user)."""
    from local_airflow import ADMIN_USER

    page = chromium.pages[0] if chromium.pages else chromium.new_page()
    shots = Screenshots(page, ARTIFACTS / Path(request.module.__file__).stem / "login")
    sign_in(page, airflow_ui.url, ADMIN_USER, airflow_ui.password, shots)
    return page


@pytest.fixture
def screenshot(request, logged_in_page):
    """``screenshot("step"[, locator])`` for this test; its final state is saved when it ends."""
    folder = ARTIFACTS / Path(request.module.__file__).stem / _slug(request.node.name)
    shots = Screenshots(logged_in_page, folder)
    yield shots
    with contextlib.suppress(Exception):  # a dead browser fails the test by itself
        shots("end")
