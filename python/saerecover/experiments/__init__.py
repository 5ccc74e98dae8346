"""Experiments: the runners that put the method to work and write run directories: the
pipeline (``recover``), baselines, the refusal, TPP and unlearning studies, sweeps, attribution
replays, CPU-side re-analysis and the merging of sharded runs."""
