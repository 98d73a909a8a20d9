"""How a stage runs: its command line, its params, its errors, and its OpenLineage run events."""
