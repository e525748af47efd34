"""Objectives written in the estimax language (none is special-cased in a pass)."""

from ._hvi import diwhvi as diwhvi
from ._hvi import hvi as hvi
from ._hvi import iwhvi as iwhvi
from ..dsl._model import LogJoint as LogJoint
from ._vi import cubo as cubo
from ._vi import elbo as elbo
from ._vi import guide_draw as guide_draw
from ._vi import iwelbo as iwelbo
from ._vi import log_weight as log_weight
from ..dsl._model import model_log_density as model_log_density
from ._vi import renyi as renyi
from ._vi import rws as rws
from ._vi import snis_forward_kl as snis_forward_kl
from ._vi import vimco as vimco
from ._score import Schedule as Schedule
from ._score import dsm as dsm
from ._score import loss_weight as loss_weight
from ._score import ssm as ssm
from ._score import ve as ve
from ._score import vp as vp
from ._fdistill import DIVERGENCES as DIVERGENCES
from ._fdistill import alpha_divergence as alpha_divergence
from ._fdistill import fdistill as fdistill
from ._fdistill import weight as fdiv_weight
