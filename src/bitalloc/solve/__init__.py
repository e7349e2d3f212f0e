"""solve: see ARCHITECTURE.md."""
