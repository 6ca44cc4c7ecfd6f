"""The Dagster layer: thin wiring of the eocausal library into assets, checks and resources."""
