"""Data rules: the dataset schema, text normalization, near-duplicates, validation, synonyms."""
