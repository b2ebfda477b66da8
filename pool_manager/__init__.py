"""The GPU pool: inventory, warm kernels, leases and their queue (no tornado, no IPython)."""
