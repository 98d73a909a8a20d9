"""Helpers shared by the stages: params, atomic outputs, hashing, the dataset schema, CLI errors."""
