"""Training: the loop, optimizer and schedule, checkpoints, and the pre-training entry point."""
