"""Import the dashboard's slow optional modules in the background, once per server process.

MLflow's client takes about two seconds to import, DVC's API one and scikit-learn's t-SNE one and a half; a page
that needs them would otherwise pay that on its first visit. The first session of a server starts
this thread; the imports then run while the user reads the first page, and a page that needs a
module before the thread reaches it simply waits on Python's import lock (no work is done twice).
"""

from __future__ import annotations

import importlib
import logging
import threading

log = logging.getLogger(__name__)

#: Slowest first: the MLflow client (Campaigns page), DVC's API (Run status), t-SNE (Design space, other views).
MODULES = ("mlflow", "dvc.repo", "sklearn.manifold")

_started = threading.Event()


def _import_all(modules: tuple[str, ...]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except (
            Exception
        ) as exc:  # a missing optional module surfaces on the page that needs it, with its message
            log.warning("dashboard warm-up: importing %s failed: %s", name, exc)


def start(modules: tuple[str, ...] = MODULES) -> bool:
    """Start the background imports unless already started in this process; True if this call started them."""
    if _started.is_set():
        return False
    _started.set()
    threading.Thread(target=_import_all, args=(modules,), name="agd-dashboard-warmup", daemon=True).start()
    return True
