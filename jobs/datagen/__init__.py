"""The built-in transaction generator: ``python -m jobs.datagen`` or :func:`generate_to_lake`."""

from jobs.datagen.landing import generate_to_lake

__all__ = ["generate_to_lake"]
