"""Drive the real dashboard in headless Chromium: start `streamlit run`, screenshot pages, time page loads.

    python -m dashboard.browser screenshot --out reports/dashboard.png     # catalog from params / AGD_CATALOG
    python -m dashboard.browser loadtime --candidates 1000000 --al-samples 50000

Chromium is Debian's (`apt-get install chromium`), driven by Playwright from PyPI with
``executable_path``; no browser is downloaded. The server binds to 127.0.0.1 on a free port.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "dashboard" / "app.py"

#: Page name -> (URL path, Playwright selectors that must all be visible: the page's text and its drawn
#: charts and tables). The default page lives at "/". A chart counts once its canvas or SVG exists, an
#: interactive table once its grid canvas does.
_VEGA = '[data-testid="stVegaLiteChart"] canvas, [data-testid="stVegaLiteChart"] svg'
_GRID = '[data-testid="stDataFrame"] canvas'
PAGES = {
    "experiments": ("", ('[data-testid="stTable"] >> text=±', _VEGA)),
    "campaigns": ("campaigns", ('[role="tab"] >> text=MLflow runs', _VEGA, _GRID)),
    "design_space": ("design_space", ("text=active-learning samples", _VEGA)),
    "candidates": ("candidates", ("text=Candidate detail", _GRID)),
    "status": ("status", ("text=Tracking URI", _GRID)),
}

#: The Campaigns page's other tabs (computed only when opened) -> selectors that show it is drawn.
CAMPAIGN_TABS = {
    "Valid decodes": ('[data-testid="stTable"] >> text=valid rate', _VEGA),
    "Kappa sweep (Fig. 5b)": ("text=New formulas above", _VEGA, _GRID),
    "Chemical spread": ("text=the chemical systems (element sets)", _GRID),
    "MLflow runs": ('[data-testid="stCaptionContainer"]:has-text("Links open"), [data-testid="stAlert"]',),
}

#: true once the script has finished and no chart (Plotly, Vega-Lite) or interactive table is left undrawn
_ALL_DRAWN = """() => {
  const pending = (box, drawn) => Array.from(document.querySelectorAll(box)).some(e => !e.querySelector(drawn));
  return !document.querySelector('[data-testid="stStatusWidget"]')
    && !pending('[data-testid="stPlotlyChart"]', '.main-svg')
    && !pending('[data-testid="stVegaLiteChart"]', 'canvas, svg')
    && !pending('[data-testid="stDataFrame"]', 'canvas');
}"""


def find_chromium() -> str | None:
    """Path of a system Chromium, if installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningApp:
    """A dashboard server started by ``running_app``."""

    url: str
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        """What the server has printed so far."""
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def running_app(
    env: dict[str, str] | None = None, port: int | None = None, timeout: float = 90.0
) -> Iterator[RunningApp]:
    """Start `streamlit run dashboard/app.py` from the project root and wait until it answers its health check."""
    port = port or free_port()
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "streamlit.log"
        with log.open("w") as sink:
            # cwd is the project root so that .streamlit/config.toml there (address 127.0.0.1) applies
            process = subprocess.Popen(
                [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(port)],
                cwd=ROOT,
                env={**os.environ, **(env or {})},
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        app = RunningApp(f"http://127.0.0.1:{port}", process, log)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"streamlit exited with {process.returncode}:\n{app.output()}")
                try:
                    with urllib.request.urlopen(f"{app.url}/_stcore/health", timeout=2) as answer:
                        if answer.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"streamlit did not answer on {app.url} within {timeout:g} s:\n{app.output()}"
                    )
                time.sleep(0.3)
            yield app
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def chromium_page(width: int = 1400, height: int = 1600) -> Iterator:
    """A Playwright page in headless system Chromium."""
    from playwright.sync_api import sync_playwright

    executable = find_chromium()
    if executable is None:
        raise RuntimeError("no chromium on PATH; install it with `apt-get install -y chromium`")
    with sync_playwright() as playwright:
        # --no-sandbox: Chromium refuses its sandbox when run as root (CI runs as root)
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def load_page(page, base_url: str, name: str, timeout_s: float = 120.0, *, click: bool = False) -> float:
    """Open one dashboard page and wait until its script has finished and its text, charts and tables are
    drawn (every selector of :data:`PAGES`, then no chart or table left blank); seconds taken.

    ``click``: go there by the sidebar's link, as a user moves between pages (Streamlit reruns the
    script over its open connection; the browser keeps the chart code it has loaded), not by URL.
    """
    path, ready = PAGES[name]
    start = time.perf_counter()
    if click:
        page.locator(f'[data-testid="stSidebarNav"] a[href="{base_url}/{path}"]').first.click()
    else:
        page.goto(f"{base_url}/{path}")
    for selector in ready:
        page.locator(selector).first.wait_for(state="visible", timeout=timeout_s * 1000)
    # while a script runs Streamlit shows its status widget; charts and grids draw after their data arrives
    page.wait_for_function(_ALL_DRAWN, timeout=timeout_s * 1000)
    return time.perf_counter() - start


def open_tab(page, label: str, ready: Sequence[str], timeout_s: float = 120.0) -> float:
    """Click the tab ``label`` on the open page and wait until its content is drawn; seconds taken."""
    start = time.perf_counter()
    page.locator(f'[role="tab"] >> text="{label}"').first.click()
    for selector in ready:
        page.locator(selector).first.wait_for(state="visible", timeout=timeout_s * 1000)
    page.wait_for_function(_ALL_DRAWN, timeout=timeout_s * 1000)
    return time.perf_counter() - start


def screenshot(out: Path, name: str = "experiments", env: dict[str, str] | None = None) -> Path:
    """Start the app, open one page and save a full-page screenshot to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with running_app(env) as app, chromium_page() as page:
        load_page(page, app.url, name)
        page.screenshot(path=str(out), full_page=True)
    return out


def measure_load_times(db: Path, repeats: int = 2) -> dict[str, dict[str, list[float]]]:
    """Seconds to load each page on the catalog ``db``, three ways, ``repeats`` times each, on one server
    (its first loads fill the query caches):

    * ``fresh browser``: a new Chromium (empty HTTP and code caches) opens the page's URL: a first visit;
    * ``same browser, URL``: one Chromium opens each page's URL in turn (a reload with warm caches);
    * ``sidebar click``: one Chromium opens the first page, then moves to each page by its sidebar link;
    * ``campaigns tab``: one Chromium opens the Campaigns page, then each of its other tabs in turn.
    """
    times: dict[str, dict[str, list[float]]] = {
        "fresh browser": {},
        "same browser, URL": {},
        "sidebar click": {},
        "campaigns tab": {},
    }
    with running_app({"AGD_CATALOG": str(db)}) as app:
        for _ in range(repeats):
            for name in PAGES:
                with chromium_page() as page:
                    times["fresh browser"].setdefault(name, []).append(load_page(page, app.url, name))
        with chromium_page() as page:
            for _ in range(repeats):
                for name in PAGES:
                    times["same browser, URL"].setdefault(name, []).append(load_page(page, app.url, name))
        with chromium_page() as page:
            names = list(PAGES)
            load_page(page, app.url, names[-1])
            for _ in range(repeats):
                for name in names:
                    times["sidebar click"].setdefault(name, []).append(
                        load_page(page, app.url, name, click=True)
                    )
        with chromium_page() as page:
            for _ in range(repeats):
                load_page(page, app.url, "campaigns")
                for label, ready in CAMPAIGN_TABS.items():
                    times["campaigns tab"].setdefault(label, []).append(open_tab(page, label, ready))
    return times


def _cmd_screenshot(args: argparse.Namespace) -> int:
    env = {"AGD_CATALOG": str(Path(args.catalog).resolve())} if args.catalog else {}
    print(screenshot(Path(args.out), args.page, env))
    return 0


def _cmd_loadtime(args: argparse.Namespace) -> int:
    from agd.config import DesignMapConfig
    from dashboard.synthetic import synthetic_tables, write_synthetic_catalog

    if args.catalog:  # an existing catalog, e.g. the full pipeline's
        db = Path(args.catalog).resolve()
        if not db.is_file():
            print(
                f"{db}: no catalog; build it with `dvc repro pipelines/dvc.yaml` or `agd catalog`",
                file=sys.stderr,
            )
            return 2
    else:
        folder = Path(args.workdir or tempfile.mkdtemp(prefix="agd-loadtime-"))
        db = folder / "agd.duckdb"
    if not args.catalog and not db.is_file():
        start = time.perf_counter()
        # ~50k suggestions: 11 campaigns x repeats x (initial + rounds x batch)
        tables = synthetic_tables(
            n_candidates=args.candidates,
            n_repeats=10,
            n_initial=300,
            n_rounds=50,
            batch=max(1, round((args.al_samples / 110 - 300) / 50)),
            n_hits=2000,
            latent_dim=128,
            seed=0,
        )
        counts = write_synthetic_catalog(db, folder / "parquet", tables, design_map=DesignMapConfig())
        print(f"built {db} in {time.perf_counter() - start:.1f} s: {counts}")
    for way, pages in measure_load_times(db, repeats=args.repeats).items():
        print(way)
        for path, seconds in pages.items():
            print(f"  {path:22s} " + "  ".join(f"{s:6.2f} s" for s in seconds))
    if args.screenshot:
        print(screenshot(Path(args.screenshot), "experiments", {"AGD_CATALOG": str(db)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: screenshot or loadtime."""
    parser = argparse.ArgumentParser(prog="python -m dashboard.browser", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    shot = commands.add_parser("screenshot", help="save a screenshot of one page")
    shot.add_argument("--out", default="reports/dashboard.png")
    shot.add_argument("--page", default="experiments", choices=list(PAGES))
    shot.add_argument("--catalog", default=None, help="catalog file (default: AGD_CATALOG or params.yaml)")
    shot.set_defaults(func=_cmd_screenshot)
    load = commands.add_parser("loadtime", help="time page loads on a large synthetic catalog")
    load.add_argument("--candidates", type=int, default=1_000_000)
    load.add_argument("--al-samples", type=int, default=50_000)
    load.add_argument("--repeats", type=int, default=2)
    load.add_argument("--workdir", default=None, help="keep (and reuse) the synthetic catalog here")
    load.add_argument("--catalog", default=None, help="time this catalog instead of a synthetic one")
    load.add_argument("--screenshot", default=None, help="also save a screenshot of the Experiments page")
    load.set_defaults(func=_cmd_loadtime)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
