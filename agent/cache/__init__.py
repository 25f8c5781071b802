"""The base-image index and the cache manager pass."""
