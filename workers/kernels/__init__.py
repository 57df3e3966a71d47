"""Pure numeric kernels (numpy/numba): arrays, scalars and a ``np.random.Generator`` in, arrays out.

Nothing in this package does I/O, reads the environment or the clock, or configures logging.
"""
