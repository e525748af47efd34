"""``estimax demo``: fit the shipped two-component mixture (``text/demos/mixture.emx``) to
generated data, and compare the fit with the truth."""

from __future__ import annotations

import importlib.resources
import math
import os
import shutil

import numpy as np

from ._errors import _EXIT_USAGE, _Fail, _Invocation
from ._inputs import _load_program, _read_data
from ._plan import _table
from ._run import _train

_DEMO_FILE = "mixture.emx"
_DEMO_WEIGHTS = (0.35, 0.65)  # of the components
_DEMO_MEANS = (-2.0, 2.0)
_DEMO_SCALES = (0.5, 0.7)


def _demo_data(n: int, seed: int):
    """``(x, labels)``: ``n`` points of a known two-component mixture."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(2, size=n, p=_DEMO_WEIGHTS)
    x = rng.normal(np.asarray(_DEMO_MEANS)[labels], np.asarray(_DEMO_SCALES)[labels])
    return x.astype(np.float32), labels


def _cmd_demo(args, invocation: _Invocation) -> int:
    out = args.out
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise _Fail(f"cannot create the output folder {out}: {e.strerror or e}", _EXIT_USAGE) from None
    source = importlib.resources.files("estimax.text").joinpath("demos", _DEMO_FILE)
    path = os.path.join(out, _DEMO_FILE)
    with importlib.resources.as_file(source) as packaged:
        shutil.copyfile(packaged, path)
    x, labels = _demo_data(args.n, seed=0)
    data_path = os.path.join(out, "mixture-data.npz")
    np.savez(data_path, x=x)
    print(f"the demo: a two-component Gaussian mixture fitted by variational inference, written in {path}")
    print(
        f"{len(x)} points of a mixture with weights {list(_DEMO_WEIGHTS)}, means {list(_DEMO_MEANS)}, "
        f"scales {list(_DEMO_SCALES)} (in {data_path})\n"
    )
    program = _load_program(path, invocation)
    data, dims = _read_data(program, data_path, needed=True, invocation=invocation)
    status, learned = _train(
        program,
        data,
        dims,
        steps=args.steps,
        optimizer_name="adam",
        lr=args.lr,
        seed=args.seed,
        chunk=args.chunk,
        out=out,
        fresh=True,
        progress=False if args.no_progress else None,  # a bar on a terminal only
    )
    if learned is None:
        return status
    weight1 = 1.0 / (1.0 + math.exp(-float(learned["w_logit"])))
    rows = [
        (
            "weights",
            list(_DEMO_WEIGHTS),
            [float(np.mean(labels == k)) for k in (0, 1)],
            [1.0 - weight1, weight1],
        ),
        ("means", list(_DEMO_MEANS), [float(x[labels == k].mean()) for k in (0, 1)], learned["m"].tolist()),
        (
            "scales",
            list(_DEMO_SCALES),
            [float(x[labels == k].std()) for k in (0, 1)],
            np.exp(learned["log_sigma"]).tolist(),
        ),
    ]

    def fmt(v):
        return "[" + ", ".join(f"{a:+.2f}" for a in v) + "]"

    print("\nthe fitted mixture:")
    print(
        "\n".join(
            _table(
                ("", "true", "in the sample", "fitted"),
                [(r[0], fmt(r[1]), fmt(r[2]), fmt(r[3])) for r in rows],
            )
        )
    )
    again = f"estimax run {path} --data {data_path} --out {out} --steps {args.steps} --lr {args.lr:g}"
    print(f"\nto run it again: {again}")
    return status
