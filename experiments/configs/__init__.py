"""Experiment configurations as code: ``get_config()`` returns an ``ml_collections.ConfigDict``.

``default`` is the offline CPU benchmark of the main job; every variant imports
it and overrides only what changes. Load one with ``--config path/to/file.py``
(``ml_collections.config_flags``) or :func:`experiments.configs.load`.
"""
