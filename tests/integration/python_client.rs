//! The Python client example (`examples/python/`) against a running worker.
