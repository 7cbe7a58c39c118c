"""The gateway: OpenAI-style REST with SSE and the public gRPC API.

It validates requests, applies chat templates, tokenizes and detokenizes, checks
stop strings and forwards token ids over one gRPC session to the scheduler. It
never holds KV state, batches or imports torch.
"""
