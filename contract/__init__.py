"""The types every layer may import: the job spec and the errors netloupe raises for users."""
