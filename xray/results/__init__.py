"""Result tables (Arrow schemas), the Parquet sink and de-duplicating readers."""
