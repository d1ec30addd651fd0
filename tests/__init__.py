"""alphaengine tests."""
