"""How bytes are written and named: atomic outputs and content hashes."""
