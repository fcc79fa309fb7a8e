"""Applications of metagradients on sklearn digits (one module each)."""
