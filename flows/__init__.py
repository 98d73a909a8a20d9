"""Prefect flows over the DVC pipeline, and the lineage tools. Imports nothing from `stages`."""
