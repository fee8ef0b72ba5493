"""PostgreSQL plumbing shared by the state stores of `state.url` (pgstate/connection.py)."""
