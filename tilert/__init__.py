"""tilert."""
