"""Template image handlers: interface, implementations and registry."""
