"""Example workflows shipped with dagfusion (package data; list them with :func:`dagfusion.examples.list_examples`)."""
