"""dagfusion.testing: a pytest plugin for plugin authors (work in progress)."""
