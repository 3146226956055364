"""Job spec, model and dataset resolution, the Ray Data plan, the driver and the CLI."""
