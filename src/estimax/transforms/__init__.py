"""Passes over staged programs. Kept import-light: the passes are loaded by the API."""

from .estimators import register_mvd as register_mvd
