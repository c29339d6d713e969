"""data_modules."""
