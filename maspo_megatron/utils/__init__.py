"""Small helpers with no project imports, below every other package: LaTeX scanning, free ports,
atomic small-file writes."""
