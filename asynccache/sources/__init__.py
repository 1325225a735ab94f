"""Where /testbed bytes come from: the Docker daemon or a registry, behind one protocol."""
