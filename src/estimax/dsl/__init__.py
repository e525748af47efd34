"""The Python front-end: primitives and decorators."""
