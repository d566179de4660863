"""The files of a job's checkpoint directory, without torch: training/checkpoint.py writes them,
storage/checkpoints.py (in the service, which must not import torch to copy them) reads them."""

NAME = "checkpoint"  # the checkpoint inside a job's checkpoint directory (replaced whole by renames)
STATE = "state.pt"  # the run's state: step, position, metrics, random state, precomputed reference
WEIGHTS = "weights"  # the DCP directory: the trainable weights and the optimizer state
ID = "id"  # a fresh id in each checkpoint written: a copier checks it did not change under it
