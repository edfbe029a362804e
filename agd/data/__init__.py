"""Raw data sources and dataset preparation."""
