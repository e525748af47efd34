"""Per-site gradient strategies."""

from ._base import ContinuationStrategy as ContinuationStrategy
from ._base import LocalStrategy as LocalStrategy
from ._base import SiteContext as SiteContext
from ._base import Strategy as Strategy
from ._enum import Enum as Enum
from ._enum import enum as enum
from ._mvd import MVD as MVD
from ._mvd import mvd as mvd
from ._mvd import register_mvd as register_mvd
from ._reinforce import Reinforce as Reinforce
from ._relax import GumbelSoftmax as GumbelSoftmax
from ._relax import StraightThrough as StraightThrough
from ._relax import gumbel_softmax as gumbel_softmax
from ._relax import straight_through as straight_through
from ._reinforce import ema_update as ema_update
from ._reinforce import reinforce as reinforce
from ._reparam import Reparam as Reparam
from ._reparam import reparam as reparam
