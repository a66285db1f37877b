"""Pydantic models: the single source of truth for every file, record and output format."""
