"""Experiments: the fine-tuning jobs built on tpgm_jax, with Flax, grain, TFDS and orbax.

Entry points (``python -m experiments.<name>``): ``main`` (the main job), ``pretrain``,
``study``, ``diagnose``, ``convert``, ``build_data``. A config is resolved once into a plan
of runs (:mod:`experiments.plan`), which the :mod:`experiments.runner` executes in an
:mod:`experiments.environment`; the packages hold the training machinery
(``training``), the models and their conversion (``models``), the data (``data``) and the
analysis (``analysis``).
"""
