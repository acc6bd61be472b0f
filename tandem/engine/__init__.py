"""The built-in engine: paged KV cache, prefix caching, continuous batching, sampling.

It knows nothing of the runtime: `AsyncEngine` is the whole surface a worker or an
embedded frontend talks to.
"""
