"""Result tables (Arrow schemas), the Parquet sink, de-duplicating readers, and where a run's
stored URIs point now (locations)."""
