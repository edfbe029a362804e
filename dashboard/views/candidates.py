"""Candidates: filter screening hits or generated formulas, search, sort, download; one candidate in detail."""

from pathlib import Path

import streamlit as st

from dashboard import data, ui

st.title("Candidates")
ui.caption_catalog()
status = ui.catalog_status()
if not status.counts.get("screening") and not status.counts.get("candidates"):
    st.info(data.empty_table_message("screening") + " " + data.empty_table_message("candidates"))
    st.stop()

sources = [s for s, table in (("hits", "screening"), ("generated", "candidates")) if status.counts.get(table)]
source = st.radio(
    "Show",
    sources,
    format_func={"hits": "screening hits", "generated": "all generated candidates"}.get,
    horizontal=True,
    key="cand_source",
)

filters: dict = {"source": source}
with st.container(border=True):
    if source == "hits":
        c1, c2, c3, c4 = st.columns(4)
        for column, label, key, target in (
            ("gap_window", "Band-gap window", "cand_windows", "windows"),
            ("experiment", "Experiment", "cand_experiments", "experiments"),
            ("model", "Model", "cand_models", "models"),
            ("training_set", "Training set", "cand_training_sets", "training_sets"),
        ):
            options = ui.query("distinct_values", "screening", column)
            box = {"cand_windows": c1, "cand_experiments": c2, "cand_models": c3, "cand_training_sets": c4}[
                key
            ]
            filters[target] = tuple(box.multiselect(label, options, default=options, key=key))
        g1, g2 = st.columns(2)
        filters["gap_min"] = g1.number_input(
            "Predicted gap from (eV)", value=None, step=0.5, key="cand_gap_min"
        )
        filters["gap_max"] = g2.number_input(
            "Predicted gap to (eV)", value=None, step=0.5, key="cand_gap_max"
        )
    v1, v2, v3, v4 = st.columns(4)
    filters["validity"] = v1.selectbox("Validity", ["any", "valid", "invalid"], key="cand_validity")
    filters["formation_energy_max"] = v2.number_input(
        "Formation energy at most (eV/atom)",
        value=None,
        step=0.1,
        key="cand_fe_max",
        help="needs a relaxed structure",
    )
    filters["formula_text"] = v3.text_input("Formula contains", key="cand_formula")
    element_text = v4.text_input("Contains elements", placeholder="e.g. Ga, O", key="cand_elements")
    try:
        filters["elements"] = data.parse_elements(element_text)
    except ValueError as exc:
        st.warning(f"Element filter ignored: {exc}")
        filters["elements"] = ()
    columns = data.HIT_COLUMNS if source == "hits" else data.GENERATED_COLUMNS
    s1, s2, s3 = st.columns(3)
    default_sort = "predicted_gap" if source == "hits" else "formula"
    filters["sort_by"] = s1.selectbox("Sort by", columns, index=columns.index(default_sort), key="cand_sort")
    filters["descending"] = s2.toggle("Descending", value=source == "hits", key="cand_desc")
    filters["limit"] = s3.select_slider("Rows shown", [100, 500, 1000, 5000], value=500, key="cand_limit")

query = data.CandidateQuery(**filters)
rows, total = ui.query("search_candidates", query)
st.markdown(f"**{total:,}** matching rows" + (f" (first {len(rows):,} shown)" if total > len(rows) else ""))
st.dataframe(
    rows,
    hide_index=True,
    width="stretch",
    column_config={
        "predicted_gap": st.column_config.NumberColumn("predicted gap (eV)", format="%.2f"),
        "oracle_gap": st.column_config.NumberColumn("oracle gap (eV)", format="%.2f"),
        "beyond_training": st.column_config.CheckboxColumn(
            "beyond training", help="the predicted gap lies outside the labels its model trained on"
        ),
        "formation_energy_per_atom": st.column_config.NumberColumn("E_form (eV/atom)", format="%.3f"),
        "dft_band_gap": st.column_config.NumberColumn("DFT gap (eV)", format="%.2f"),
    },
    key="cand_table",
)
cfg = ui.settings()
st.download_button(
    "Download CSV (all matching rows, at most 200,000)",
    data=lambda: data.candidates_csv(cfg.catalog, query),
    file_name=f"agd_candidates_{source}.csv",
    mime="text/csv",
    key="cand_csv",
)

# --- one candidate in detail --------------------------------------------------------------------
st.subheader("Candidate detail")
formulas = list(dict.fromkeys(rows["formula"]))
if not formulas:
    st.info("No candidate matches the filters.")
    st.stop()
formula = st.selectbox("Formula", formulas, key="cand_detail")
detail = ui.query("candidate_detail", formula)
structures, dft = detail["structures"], detail["dft_results"]

left, right = st.columns(2)
with left:
    st.markdown("**Structure**")
    if structures.empty:
        st.info("No structure yet: run `agd structures` on the screening hits, then `agd catalog`.")
    for _, structure in structures.iterrows():
        st.markdown(
            f"Template **{structure['template_formula']}** (`{structure['template_id']}`), "
            f"ElMD {structure['elmd_distance']:.3f}; status `{structure['status']}`"
        )
        if structure["cif"]:
            try:
                info, sites = data.structure_summary(structure["cif"])
            except ValueError as exc:
                st.warning(str(exc))
            else:
                st.table(
                    {
                        "lattice": [
                            f"a={info['a']:.3f} Å, b={info['b']:.3f} Å, c={info['c']:.3f} Å",
                            f"α={info['alpha']:.1f}°, β={info['beta']:.1f}°, γ={info['gamma']:.1f}°",
                            f"V={info['volume']:.2f} Å³, {info['sites']} sites, {info['space group']}",
                        ]
                    }
                )
                st.dataframe(sites.round(4), hide_index=True, width="stretch", height=200, key=f"sites_{_}")
        energies = {
            "formation energy (eV/atom)": structure["formation_energy_per_atom"],
            "energy (eV/atom)": structure["energy_per_atom"],
            "relaxation steps": structure["relax_steps"],
            "converged": structure["converged"],
        }
        st.table({"value": {k: "–" if v is None else str(v) for k, v in energies.items()}})
        if structure["vasp_dir"]:
            folder = Path(structure["vasp_dir"])
            folder = folder if folder.is_absolute() else cfg.root / folder
            if folder.is_dir():
                files = sorted(p.name for p in folder.rglob("*") if p.is_file())[:20]
                st.markdown(f"VASP inputs: `{folder}` ({', '.join(files) or 'empty'})")
            else:
                st.markdown(f"VASP inputs: `{structure['vasp_dir']}` (not on this machine)")
with right:
    st.markdown("**DFT results**")
    if dft.empty:
        st.info("No DFT result imported for this formula (`agd import-dft DIR`).")
    else:
        st.dataframe(
            dft[
                [
                    "band_gap",
                    "formation_energy_per_atom",
                    "total_energy",
                    "converged",
                    "status",
                    "path",
                    "imported_at",
                ]
            ],
            hide_index=True,
            width="stretch",
            key="cand_dft",
        )
    st.markdown("**Screening hits**")
    hits = detail["screening"]
    if hits.empty:
        st.caption("not a screening hit")
    else:
        st.dataframe(
            hits[data.HIT_PROVENANCE + ["predicted_gap", "oracle_gap", "beyond_training"]],
            hide_index=True,
            width="stretch",
            key="cand_hits",
        )
