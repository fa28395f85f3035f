"""The migrations, shipped inside the package as `vector_sync.sql` (see pyproject.toml)."""
