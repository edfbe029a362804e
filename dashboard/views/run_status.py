"""Run status: which DVC stages are up to date, and rows per catalog table."""

from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import streamlit as st

from dashboard import data, ui


@st.cache_data(show_spinner=False, ttl=60)
def _dvc_status(dvc_file: str, mtime: int) -> data.DvcStatus:
    return data.dvc_status(Path(dvc_file))


cfg = ui.settings()
st.title("Run status")
if cfg.params_error:
    st.warning(f"params.yaml has errors, defaults are used: {cfg.params_error}")

st.subheader("Catalog")
status = ui.catalog_status()
if status.error:
    st.error(status.message())
else:
    stat = status.path.stat()
    modified = datetime.fromtimestamp(stat.st_mtime, UTC).strftime("%Y-%m-%d %H:%M UTC")
    st.caption(f"`{status.path}`: {stat.st_size / 1e6:.1f} MB, built {modified}")
    counts = pd.DataFrame(
        [
            {"table": table, "rows": n, "produced by": data.PRODUCERS[table] if not n else ""}
            for table, n in status.counts.items()
        ]
    )
    st.table(counts.set_index("table"))
    if not status.ok:
        st.info(status.message())

st.subheader("DVC pipeline")
st.caption(f"`dvc status {cfg.dvc_file}`")
if st.button("Refresh DVC status"):
    _dvc_status.clear()
mtime = data.catalog_version(cfg.dvc_file)
with st.spinner("Running dvc status ..."):
    dvc = _dvc_status(str(cfg.dvc_file), mtime)
if dvc.error:
    st.warning(f"DVC status unavailable: {dvc.error}")
else:
    n_changed = int((dvc.stages["state"] != "up to date").sum())
    if n_changed:
        st.warning(f"{n_changed} of {len(dvc.stages)} stages need `{data.BUILD_COMMAND}`.")
    else:
        st.success(f"All {len(dvc.stages)} stages are up to date.")
    st.dataframe(dvc.stages, hide_index=True, width="stretch")

st.subheader("MLflow")
st.caption(
    f"Tracking URI: `{cfg.tracking_uri}`; browse with `mlflow ui --backend-store-uri {cfg.tracking_uri}`"
)
