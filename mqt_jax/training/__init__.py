"""Training: the sharded train step (trainer), the loop with resume and preemption (loop),
stage 0 (clip_pretrain), the multi-stage recipe behind `mqt-jax train` (recipe), metrics and
synthetic batches."""
