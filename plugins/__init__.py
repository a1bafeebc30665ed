"""The built-in methods, one module each, registered through the ``batchkin``
entry-point group exactly like a third party's plugins."""
