"""Code that runs inside Ray actors: the explain worker, layer capture, the method registry."""
