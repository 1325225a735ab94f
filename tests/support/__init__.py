"""Builders shared by the tests, the demo and the bench: R2E-like images, layers, trees."""
