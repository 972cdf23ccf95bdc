"""counting: count the objects in storage-bin photos.

The package holds data sources, the split, models, training, tuning, diagnostics, packaging, serving and
deployment; `flows/counting_flow.py` drives it with Metaflow.
"""

__version__ = "0.1.0"
