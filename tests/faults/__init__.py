"""The fault suite: bad input, non-finite numbers, killed runs and corrupted checkpoints (issue 8)."""
