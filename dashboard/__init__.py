"""Streamlit dashboard over the agd catalog and MLflow (`streamlit run dashboard/app.py`)."""
