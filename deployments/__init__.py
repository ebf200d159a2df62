"""Ray Serve wrappers around the library: one thin deployment per box of the graph."""
