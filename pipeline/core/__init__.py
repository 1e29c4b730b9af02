"""Bottom layer: process environment, progress bars, distributed helpers, MLflow tracking."""
