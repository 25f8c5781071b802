"""Template image handlers: the interface, the implementations, the registry."""
