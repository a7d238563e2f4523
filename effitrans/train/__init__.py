"""The sharded, resumable trainer (trainer.Trainer), its tasks, optimizer, checkpoints and partitioning, and the
train / mesh config keys (schema). Import the submodules themselves; this package imports nothing."""
