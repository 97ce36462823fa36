"""Plain test helpers (functions, classes, constants); the conftest.py files keep only fixtures."""
