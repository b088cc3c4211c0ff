"""The UI in a real headless Chromium against a real API server: sign in through the login form,
then the trigger form of ``fraud_nightly`` that Airflow renders from the DAG's Params refuses bad
values in the browser and triggers a run with exactly the good ones (checked through the REST API).

Screenshots of every step: ``test-artifacts/browser/test_browser/`` (see ``tests/browser.py``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import uuid

import pytest
from browser import REPO, browser_processes, chromium_executable

pytestmark = pytest.mark.slow

DAG_ID = "fraud_nightly"
FORM_DEFAULTS = {"date": None, "force_retrain": False, "model": "seq", "window_days": 21, "k": 100, "seed": 0}


def expect(target):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(target)


def open_trigger_form(page, url: str):
    """The DAG's page, its Trigger button, the dialog it opens (a Locator); the form starts afresh."""
    page.goto(f"{url}/dags/{DAG_ID}")
    page.get_by_role("button", name="Trigger Dag").click()
    dialog = page.get_by_role("dialog").filter(has=page.get_by_role("heading", name=f"Trigger Dag - {DAG_ID}"))
    expect(dialog).to_be_visible()
    expect(dialog.get_by_role("spinbutton", name="Training window (days)")).to_have_value("21")
    return dialog


def field(dialog, label: str):
    """The row of the form whose label is ``label``."""
    return dialog.get_by_role("group").filter(has_text=label)


def set_conf_json(page, dialog, conf: dict, run_id: str) -> None:
    """Advanced Options: the run's id, and the whole configuration typed into the JSON editor."""
    dialog.get_by_role("button", name="Advanced Options").click()
    dialog.get_by_role("textbox", name="Run ID").fill(run_id)
    dialog.get_by_role("code").click()  # the editor takes the keyboard
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    page.keyboard.insert_text(json.dumps(conf))  # as pasted: the editor adds no closing brackets
    dialog.get_by_role("textbox", name="Run ID").click()  # leave the editor: the form takes the JSON


def run_ids(airflow_ui) -> set[str]:
    return {r["dag_run_id"] for r in airflow_ui.dag_runs(DAG_ID)}


def test_chromium_is_installed():
    path = chromium_executable()
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    assert re.search(r"(Chromium|Chrome) \d+\.\d+\.\d+\.\d+", out), f"{path} --version printed {out!r}"


def test_missing_chromium_fails_saying_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("FRAUD_CHROMIUM", str(tmp_path / "no-chromium"))
    with pytest.raises(pytest.fail.Exception) as exc:
        chromium_executable()
    assert "Chromium not found" in str(exc.value)
    assert "apt-get install chromium" in str(exc.value)


def test_chromium_processes_end_even_when_the_test_fails(tmp_path):
    """The launcher the ``chromium`` fixture uses leaves no Chromium process behind, also when the
    code inside it raises (run in a child process, whose browser's processes are then looked for)."""
    folder = tmp_path / "chromium"
    script = textwrap.dedent(
        f"""
        import json, sys
        from pathlib import Path
        sys.path.insert(0, {str(REPO / "tests")!r})
        from browser import browser_processes, launch_chromium
        folder = Path({str(folder)!r})
        try:
            with launch_chromium(folder) as context:
                context.new_page().set_content("<h1>up</h1>")
                print(json.dumps([p.pid for p in browser_processes(folder)]), flush=True)
                raise RuntimeError("a failing test")
        except RuntimeError:
            pass
        print(json.dumps([p.pid for p in browser_processes(folder)]), flush=True)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    during, after = (json.loads(line) for line in proc.stdout.strip().splitlines()[-2:])
    assert len(during) >= 2, f"the browser's processes were not seen while it was open: {during}"
    assert after == []
    assert browser_processes(folder) == [], "Chromium processes outlived the process that started them"


def test_login_form_signs_in(logged_in_page, airflow_ui, screenshot):
    page = logged_in_page
    page.goto(f"{airflow_ui.url}/dags")
    expect(page.get_by_role("link", name=DAG_ID)).to_be_visible()
    assert "_token" in {c["name"] for c in page.context.cookies()}
    screenshot("dags-list")


def test_form_is_typed_from_the_params(logged_in_page, airflow_ui, screenshot):
    dialog = open_trigger_form(logged_in_page, airflow_ui.url)
    screenshot("trigger-form")
    expect(field(dialog, "Date to process (YYYY-MM-DD)").locator("input[type=date]")).to_have_value("")
    expect(dialog.get_by_role("checkbox", name="Train even if D is not a training day")).not_to_be_checked()
    expect(field(dialog, "Model kind to train")).to_contain_text("seq")
    window = dialog.get_by_role("spinbutton", name="Training window (days)")
    expect(window).to_have_attribute("aria-valuemin", "1")
    expect(window).to_have_attribute("aria-valuemax", "90")
    expect(dialog.get_by_role("spinbutton", name="Cards in the alert list")).to_have_value("100")
    expect(dialog.get_by_role("spinbutton", name="Training seed")).to_have_value("0")
    dialog.get_by_role("combobox", name="Model kind to train").click()
    options = logged_in_page.get_by_role("option")
    expect(options).to_have_text(["mlp", "seq"])
    screenshot("model-choices")


def test_empty_required_field_disables_trigger(logged_in_page, airflow_ui, screenshot):
    before = run_ids(airflow_ui)
    dialog = open_trigger_form(logged_in_page, airflow_ui.url)
    dialog.get_by_role("spinbutton", name="Training window (days)").fill("")
    expect(field(dialog, "Training window (days)")).to_contain_text("This field is required")
    trigger = dialog.get_by_role("button", name="Trigger")
    expect(trigger).to_be_disabled()
    screenshot("window-days-empty")
    assert run_ids(airflow_ui) == before


OUT_OF_RANGE = [  # (field, typed, what the field holds once left): the Params' minimum and maximum
    ("Training window (days)", "0", "1"),
    ("Training window (days)", "91", "90"),
    ("Cards in the alert list", "0", "1"),
    ("Training seed", "-1", "0"),
]


def test_out_of_range_number_is_not_kept(logged_in_page, airflow_ui, screenshot):
    """The number fields take the Params' bounds: a value past one is replaced by the bound as the
    field is left, so the form never holds it and cannot send it."""
    before = run_ids(airflow_ui)
    dialog = open_trigger_form(logged_in_page, airflow_ui.url)
    for label, typed, kept in OUT_OF_RANGE:
        box = dialog.get_by_role("spinbutton", name=label)
        box.fill(typed)
        expect(box).to_have_value(typed)
        screenshot(f"{label}-typed-{typed}")
        box.press("Tab")
        expect(box).to_have_value(kept)
        screenshot(f"{label}-left-{kept}")
    assert run_ids(airflow_ui) == before


def test_malformed_json_disables_trigger(logged_in_page, airflow_ui, screenshot):
    before = run_ids(airflow_ui)
    page = logged_in_page
    dialog = open_trigger_form(page, airflow_ui.url)
    dialog.get_by_role("button", name="Advanced Options").click()
    dialog.get_by_role("code").click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    page.keyboard.insert_text('{"window_days": 3,')
    dialog.get_by_role("textbox", name="Run ID").click()
    expect(dialog.get_by_text("Invalid JSON format")).to_be_visible()
    expect(dialog.get_by_role("button", name="Trigger")).to_be_disabled()
    screenshot("malformed-json")
    assert run_ids(airflow_ui) == before


@pytest.mark.parametrize(
    ("bad", "message"),
    [({"window_days": 0}, "Invalid input for param window_days"),
     ({"k": 0}, "Invalid input for param k"),
     ({"model": "xgboost"}, "Invalid input for param model"),
     ({"date": "2018-02-30"}, "Invalid input for param date")],
    ids=["window_days=0", "k=0", "model=xgboost", "date=2018-02-30"],
)
def test_bad_conf_is_refused_in_the_dialog(logged_in_page, airflow_ui, screenshot, bad, message):
    """A value past the Params' schema in the configuration JSON: Trigger answers in the dialog with
    the param and the rule it breaks, and no run exists."""
    before = run_ids(airflow_ui)
    page = logged_in_page
    run_id = f"browser-refused-{uuid.uuid4().hex[:8]}"
    dialog = open_trigger_form(page, airflow_ui.url)
    set_conf_json(page, dialog, {**FORM_DEFAULTS, **bad}, run_id)
    screenshot("bad-conf-entered")
    dialog.get_by_role("button", name="Trigger").click()
    expect(dialog.get_by_text(message)).to_be_visible()
    expect(page.get_by_role("status").filter(has_text="Failed to Trigger Dag").first).to_be_visible()
    screenshot("refused")
    runs = run_ids(airflow_ui)
    assert run_id not in runs
    assert runs == before


def test_good_values_trigger_a_run_with_them(logged_in_page, airflow_ui, screenshot):
    page = logged_in_page
    run_id = f"browser-good-{uuid.uuid4().hex[:8]}"
    dialog = open_trigger_form(page, airflow_ui.url)
    field(dialog, "Date to process (YYYY-MM-DD)").locator("input[type=date]").fill("2018-04-05")
    dialog.get_by_text("Train even if D is not a training day").click()  # the switch's label
    expect(dialog.get_by_role("checkbox", name="Train even if D is not a training day")).to_be_checked()
    dialog.get_by_role("combobox", name="Model kind to train").click()
    page.get_by_role("option", name="mlp", exact=True).click()
    dialog.get_by_role("spinbutton", name="Training window (days)").fill("3")
    dialog.get_by_role("spinbutton", name="Cards in the alert list").fill("25")
    dialog.get_by_role("spinbutton", name="Training seed").fill("7")
    dialog.get_by_role("spinbutton", name="Training seed").press("Tab")
    screenshot("form-filled")
    dialog.get_by_role("button", name="Advanced Options").click()
    dialog.get_by_role("textbox", name="Run ID").fill(run_id)
    expected = {"date": "2018-04-05", "force_retrain": True, "model": "mlp", "window_days": 3, "k": 25, "seed": 7}
    # the form and its JSON view agree before anything is sent
    editor_text = dialog.get_by_role("code").locator(".view-lines").inner_text()
    assert json.loads(re.sub(r"\s+", " ", editor_text.replace("\u00a0", " "))) == expected, editor_text
    screenshot("run-id-and-json")
    assert run_id not in run_ids(airflow_ui)
    dialog.get_by_role("button", name="Trigger").click()
    expect(page.get_by_role("status").filter(has_text="Dag Run Triggered").first).to_be_visible()
    expect(page).to_have_url(re.compile(rf"/dags/{DAG_ID}/runs/{run_id}"))
    expect(page.get_by_text(run_id).first).to_be_visible()  # the run's page shows the run
    screenshot("run-page")
    runs = {r["dag_run_id"]: r for r in airflow_ui.dag_runs(DAG_ID)}
    assert run_id in runs, sorted(runs)
    assert runs[run_id]["conf"] == expected
    assert runs[run_id]["run_type"] == "manual"


def test_screenshots_are_kept(logged_in_page, screenshot):
    """A screenshot is a PNG file in the artifacts folder, which git ignores; the login's are there too."""
    path = screenshot("kept")
    assert path.is_relative_to(REPO / "test-artifacts" / "browser")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    login = sorted((path.parents[1] / "login").glob("*.png"))
    assert [p.name for p in login] == ["01-login-form-filled.png", "02-signed-in.png"]
    ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO)
    assert ignored.returncode == 0, f"{path} is not ignored by git"
