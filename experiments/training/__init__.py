"""The training machinery shared by pre-training and every fine-tuning method.

* :mod:`~experiments.training.loop`: the one train loop (jitted, sharded, resumable);
* :mod:`~experiments.training.methods`: the method registry (method -> optax transformation
  or post-hoc step);
* :mod:`~experiments.training.optimizers`: inner optimizers, schedules, parameter groups;
* :mod:`~experiments.training.checkpointing`: train-state checkpoints and preemption (orbax);
* :mod:`~experiments.training.weights`: params checkpoints and loading pre-trained weights;
* :mod:`~experiments.training.distributed`: the mesh, shardings, multi-process set-up;
* :mod:`~experiments.training.evaluation`: accuracy on the ID and OOD splits.
"""
