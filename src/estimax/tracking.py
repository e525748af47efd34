"""Tracking estimators for nonlinear functions of expectations (compositional objectives).

``ex.fit(objective, ..., tracking=SCGD(beta))`` -- or ``SOX``, ``MSVR`` -- trains a program
that applies a nonlinear function to an ``ex.expect``/``ex.log_expect`` by tracking those
expectations across steps, a consistent estimator where the plug-in is biased. ``track``
gives the estimator itself, as an ``init``/``value_and_grad`` pair, for a loop of your own.
See ``estimax.transforms._compositional`` for the update formulas.
"""

from .transforms._compositional import MSVR as MSVR
from .transforms._compositional import SCGD as SCGD
from .transforms._compositional import SOX as SOX
from .transforms._compositional import Tracker as Tracker
from .transforms._compositional import TrackerState as TrackerState
from .transforms._compositional import Tracking as Tracking
from .transforms._compositional import track as track

__all__ = ["SCGD", "SOX", "MSVR", "Tracking", "Tracker", "TrackerState", "track"]
