"""The scheduler: one global queue, per-replica block managers and prefix caches,
continuous batching, and a plan for every step of every replica.

The policy (``scheduler_svc.scheduler``) is transport-free; the service shell moves
its messages over gRPC and ZeroMQ. It never runs a model, tokenizes or imports torch.
"""
