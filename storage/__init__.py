"""The on-disk contract of a run: Arrow schemas, the run layout and its atomic commit."""
