"""Image sources (Glance v2, local catalog), format inspection, conversion."""
