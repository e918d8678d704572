"""Data: tasks (which splits), input options, TFDS sources, the grain pipeline, and the
offline ``multidomain_shapes`` benchmark builder (:mod:`~experiments.data.shapes`)."""
