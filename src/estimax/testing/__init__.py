"""Public helpers to test estimators the way estimax tests its own.

- :func:`assert_unbiased`: the mean of ``n`` estimates against an exact value, with a
  tolerance from the estimates' own standard error, on a reproducible key.
- :func:`seed_from` / :func:`key_from`: keys derived from a test's inputs, so a failure
  reproduces from the printed inputs alone.
- :mod:`estimax.testing.strategies`: hypothesis strategies for distribution families and
  their parameters (needs ``hypothesis``).
"""

from ._assert import UnbiasedReport as UnbiasedReport
from ._assert import assert_unbiased as assert_unbiased
from ._assert import key_from as key_from
from ._assert import mean_and_se as mean_and_se
from ._assert import seed_from as seed_from
