"""report.json (versioned schema), report.md and a self-contained report.html."""
