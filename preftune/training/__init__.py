"""Training: one run's loop and checkpoints, several processes, the matrix of runs, rounds, memory plan, export."""
