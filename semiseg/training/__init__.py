"""Training: registry (method name -> Trainer subclass, a leaf), trainer (the one distributed loop),
distribute (strategy from TF_CONFIG / SLURM, preemption)."""
