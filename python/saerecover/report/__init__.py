"""Reports: the one number and table formatter, figures, the report of a run directory (with
task-specific sections) and of collections (sweeps, TPP). Reads run directories; never runs a
model."""
