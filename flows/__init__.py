"""Thin Prefect flows (orchestration only) and the `spaceclip` command line."""
