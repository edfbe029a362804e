"""The dashboard in a real browser: `streamlit run` on a free localhost port, headless system Chromium via Playwright."""

from __future__ import annotations

import re

import pytest

from dashboard.browser import CAMPAIGN_TABS, chromium_page, find_chromium, load_page, open_tab, running_app

pytestmark = pytest.mark.timeout(300)


def test_experiments_page_in_chromium(fixture_catalog, fixture_tables, tmp_path):
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if find_chromium() is None:
        pytest.skip("no chromium on PATH (apt-get install -y chromium); .ci/run installs it where it can")

    # Table-1 cells of the default view (window > 6 eV), computed from the fixture
    metrics = fixture_tables["screening_metrics"]
    metrics = metrics[metrics.gap_window == "gt6"]
    expected = []
    for experiment, training_set, model in (("Exp2", "AL", "roost"), ("Exp3", "random", "forest")):
        rows = metrics[
            (metrics.experiment == experiment)
            & (metrics.training_set == training_set)
            & (metrics.model == model)
        ]
        expected.append(f"{rows.recovery.mean() * 100:.1f} ± {rows.recovery.std() * 100:.1f}")
        expected.append(f"{rows.r2_test.mean():.3f} ± {rows.r2_test.std():.3f}")

    env = {"AGD_CATALOG": str(fixture_catalog), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'none.db'}"}
    with running_app(env) as app, chromium_page() as page:
        # .streamlit/config.toml at the project root binds the server to 127.0.0.1
        assert re.search(r"URL: http://127\.0\.0\.1:\d+", app.output()), app.output()
        seconds = load_page(page, app.url, "experiments")
        body = page.inner_text("body")
        screenshot = tmp_path / "artifacts" / "dashboard.png"
        screenshot.parent.mkdir()
        page.screenshot(path=str(screenshot), full_page=True)
        # Campaigns draws only its open tab; another tab's chart and table appear once it is clicked
        load_page(page, app.url, "campaigns")
        first_tab = page.inner_text("body")
        open_tab(page, "Kappa sweep (Fig. 5b)", CAMPAIGN_TABS["Kappa sweep (Fig. 5b)"])
        sweep_tab = page.inner_text("body")
        # every other tab's ready selectors (those `loadtime` waits on) must match what the tab draws
        others = {}
        for label in ("Valid decodes", "Chemical spread", "MLflow runs"):
            open_tab(page, label, CAMPAIGN_TABS[label], timeout_s=30)
            others[label] = page.inner_text("body")
    assert "Band-gap threshold" not in first_tab and "best so far" in first_tab.lower()
    assert "Band-gap threshold" in sweep_tab and "New formulas above 6 eV" in sweep_tab
    assert "valid rate" in others["Valid decodes"]
    assert "most finds in one system" in others["Chemical spread"]
    assert "No MLflow store at" in others["MLflow runs"]  # the fixture points MLflow at an empty path
    assert "Experiments: screening performance (Table 1)" in body
    for value in expected:
        assert value in body, value
    assert "Traceback" not in body and "Page not found" not in body
    assert screenshot.stat().st_size > 20_000
    print(f"experiments page rendered in {seconds:.2f} s; screenshot {screenshot}")
