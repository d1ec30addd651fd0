"""objectstore package."""
