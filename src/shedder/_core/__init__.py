"""The framework-free core: throttler, limits, waiters, errors, checks."""
