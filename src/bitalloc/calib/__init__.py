"""calib: see ARCHITECTURE.md."""
