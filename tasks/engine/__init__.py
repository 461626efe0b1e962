"""What several stages share to run: the training loop, the evaluator protocol, distributed and parallel
execution, resume state, shards, label maps and their worker processes."""
