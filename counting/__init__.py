"""counting: count the objects in storage-bin photos.

The package holds data sources, the split, models, training, tuning, diagnostics, packaging, serving and
deployment; `flows/counting_flow.py` drives it with Metaflow.
"""

__version__ = "0.1.0"

# Ship the whole package with Metaflow's code package, so remote tasks run the code of the run that started them.
METAFLOW_PACKAGE_POLICY = "include"
