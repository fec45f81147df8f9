"""Tasks that only the experiments use (the trainer's registry is ``unisd_fast.train.tasks``)."""
