"""What a run measures besides its loss: per-layer statistics, gradients and activations,
taken on logging steps (`monitor.Probes`), without changing what the model computes.
"""
