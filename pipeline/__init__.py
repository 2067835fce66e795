"""lipflow."""
