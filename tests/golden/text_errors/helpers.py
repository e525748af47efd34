"""Imported by the golden error files (import_missing_name.emx)."""


def scaled(x, k=2.0):
    return k * x
