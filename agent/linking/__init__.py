"""os-brick attach/detach and atomic links in ``_base``."""
