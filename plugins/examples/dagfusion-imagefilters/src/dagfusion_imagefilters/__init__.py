"""dagfusion-imagefilters: an example third-party dagfusion plugin.

The hooks live in :mod:`dagfusion_imagefilters.plugin` (the module the ``dagfusion`` entry point
names); this package module only carries the version, so importing it is free.
"""

__version__ = "0.2.0"
