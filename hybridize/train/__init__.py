"""Staged continual training of hybrid models: recipe, data, losses, trainable parameters, the Accelerate loop."""
