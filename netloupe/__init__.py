"""netloupe: explain neural networks at dataset scale."""
