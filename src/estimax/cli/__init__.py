"""The ``estimax`` command: check, explain and train objective files.

    estimax check FILE [--data DATA.npz] [--allow-import MODULE|PATH ...]
    estimax explain FILE [--data DATA.npz] [--params PARAMS.npz] [--variance] [--seed S]
                         [--allow-import MODULE|PATH ...]
    estimax run FILE [--data DATA.npz] [--steps N] [--optimizer adam] [--lr LR] [--seed S]
                     [--chunk C] [--out DIR] [--fresh] [--no-progress]
                     [--allow-import MODULE|PATH ...]
    estimax demo [--steps N] [--out DIR]

``main(argv)`` runs one command and returns its exit status:

- 0: done.
- 1: an error in the objective file, the data, a parameter file or a checkpoint. Errors in
  the file read ``file:line:column: error: message``, then the line with a caret under the
  offending text (and, for syntax errors, what was expected there).
- 2: a usage error: a bad option, a file that does not exist or cannot be read.
- 3: an internal error of estimax (one line; ``--debug`` shows the traceback).
- 130: interrupted (SIGINT, Ctrl-C); 143: terminated (SIGTERM). An interrupted ``run``
  saves its checkpoint first; the same command then resumes it.

Sharp edges:

- ``run`` resumes bit for bit: its checkpoint (``DIR/checkpoint/``, :func:`estimax.fit`'s,
  through orbax) holds the parameters, the optimizer state, the
  PRNG key, the step and the history, and step ``i`` of :func:`estimax.fit` uses the
  ``i``-th key split off the run's key whatever the chunking. A resumed run therefore ends
  with the parameters an uninterrupted run would have (on the same machine and JAX
  version). A checkpoint is refused when the file's parameters, the program it stages
  (comments and layout aside), the optimizer, the learning rate, the seed or the data differ
  from the run that wrote it; ``--fresh`` starts over. A file with constraints resumes the
  same way (``--steps`` may be raised). The output folder is locked while a ``run`` goes: a
  second ``run`` on it is refused, naming the process that holds it.
- Reading a file runs only code it may import: the numerical modules of the allow-list and
  ``.py`` files in the objective file's own folder (importing a ``.py`` file runs it). Any
  other import is a located error until ``--allow-import MODULE|PATH`` names it (see
  ``estimax.text._imports``).
- ``check`` and ``explain`` without ``--data`` stage the objective with every named size
  (``real[N]``) set to a small default; pass ``--data`` to use the data's sizes.
"""

from ._main import main as main
from ._plan import _plan_table as _plan_table  # the plan as `check` prints it, for tests/test_locations.py

__all__ = ["main"]
