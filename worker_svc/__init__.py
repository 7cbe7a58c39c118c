"""The worker: model weights, the paged KV cache and the forward pass of each planned step.

It decides nothing: it runs the StepPlans the scheduler sends and returns the
sampled tokens.
"""
