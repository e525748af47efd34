"""Reading the command's inputs: the objective file (FILE), the data (``--data DATA.npz``) and
parameters (``--params PARAMS.npz``), each refused with a located or one-line error before
anything is staged."""

from __future__ import annotations

import math
import os
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from numpy.lib import format as npy_format

import estimax as ex
from ..text._source import MAX_SOURCE_BYTES, not_a_regular_file
from ._errors import _EXIT_USAGE, _Fail, _Invocation


def _regular_file(path: str, missing: str, not_what: str, advice: str = "") -> None:
    """Refuse (a usage error) a ``path`` that is missing (``missing``: the message), a folder,
    or not a regular file -- a FIFO would block, /dev/zero would never end."""
    if not os.path.exists(path):
        raise _Fail(missing, _EXIT_USAGE)
    if os.path.isdir(path):
        raise _Fail(f"{path} is a directory, not {not_what}", _EXIT_USAGE)
    kind = not_a_regular_file(path)
    if kind is not None:
        raise _Fail(f"{path} is {kind}, not {not_what}{advice}", _EXIT_USAGE)


def _load_program(path: str, invocation: _Invocation, allow_imports=()):
    """The parsed, checked objective file at ``path`` (an ``ex.text.TextProgram``);
    ``allow_imports``: what it may import beyond the defaults (``--allow-import``)."""
    invocation.path = path
    _regular_file(path, f"no such file: {path}", "an objective file", "; give the path of a .emx file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SOURCE_BYTES + 1)
    except OSError as e:
        raise _Fail(f"cannot read {path}: {e.strerror or e}", _EXIT_USAGE) from None
    if len(raw) > MAX_SOURCE_BYTES:
        raise _Fail(f"{path} is larger than {MAX_SOURCE_BYTES // 2**20} MiB, too large for an objective file "
                    "(is it the right file?)", _EXIT_USAGE)
    try:
        source = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise _Fail(
            f"{path}:{line}: the file is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})"
        ) from None
    if any(not entry.strip() for entry in allow_imports or ()):
        raise _Fail("--allow-import needs a module name or a path; got an empty one", _EXIT_USAGE)
    program = ex.text.parse(source, path, allow_imports=allow_imports or ())
    invocation.program = program
    return program


def _load_npz(path: str, what: str, hint: str | None = None) -> dict:
    """The named arrays of the ``.npz`` file at ``path``, read eagerly (no pickles). Each
    array's header is read first: an array larger than the file holds (a damaged or crafted
    header) or than the machine's memory is refused before anything is allocated."""
    _regular_file(path, f"no such {what} file: {path}", f"a {what} file (.npz)")
    hint = hint or f"write it with numpy.savez({path!r}, name=array, ...)"

    def size(n: int) -> str:
        return f"{n} bytes" if n < 2**20 else f"{n / 2**30:.3g} GiB"

    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on this system: no limit but the file's own sizes
        memory = None

    def check_members(f):
        total = 0
        with zipfile.ZipFile(f) as archive:
            for info in archive.infolist():
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                need = info.file_size
                if info.filename.endswith(".npy"):
                    with archive.open(info) as member:
                        version = npy_format.read_magic(member)
                        read_header = getattr(npy_format, "_read_array_header", None)
                        if read_header is not None:
                            shape, _, dtype = read_header(member, version)
                        elif version == (1, 0):
                            shape, _, dtype = npy_format.read_array_header_1_0(member)
                        else:
                            shape, _, dtype = npy_format.read_array_header_2_0(member)
                        header = member.tell()
                    if dtype.hasobject:
                        continue  # refused when read (no pickles)
                    need = math.prod(shape) * dtype.itemsize
                    if need > info.file_size - header:
                        raise _Fail(f"{path} is damaged: the header of array {name!r} says shape {tuple(shape)} of "
                                    f"{dtype} ({size(need)}), but the file holds {size(info.file_size - header)} of "
                                    f"data for it; {hint}")
                total += need
                if memory is not None and total > memory:
                    raise _Fail(f"{path}: the arrays take {size(total)} (array {name!r} alone {size(need)}), more "
                                f"than this machine's memory ({size(memory)}); is it the right file?")

    try:
        with open(path, "rb") as f:
            magic = f.read(6)
            f.seek(0)
            if magic == b"\x93NUMPY":
                raise _Fail(f"{path} holds a single array (.npy), not named arrays; {hint}")
            if not magic.startswith(b"PK"):
                raise _Fail(f"{path} is not a .npz file (not a zip archive of arrays); {hint}")
            check_members(f)
            f.seek(0)
            loaded = np.load(f, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise _Fail(f"{path} holds a single array (.npy), not named arrays; {hint}")
            with loaded:
                return {name: np.asarray(loaded[name]) for name in loaded.files}
    except _Fail:
        raise
    except PermissionError as e:
        raise _Fail(f"cannot read {path}: {e.strerror or e}", _EXIT_USAGE) from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, NotImplementedError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _Fail(f"{path} is not a readable .npz file of arrays ({detail}); {hint}") from None


def _read_data(program, data_path: str | None, *, needed: bool, invocation: _Invocation):
    """``(data, dims)``: the validated data (``None`` when none is given) and the named sizes."""
    if data_path is None:
        if needed and program.data:
            raise _Fail(
                f"{program.filename} declares data ({_declarations(program.data.values())}); "
                "pass it with --data DATA.npz",
                _EXIT_USAGE,
            )
        return None, {}
    raw = _load_npz(data_path, "data")
    invocation.note = f"(the data come from {data_path})"  # errors below point at a declaration
    _check_data_types(program, raw)
    data = program.validate_data(raw)
    dims = program.dims_from(raw)
    invocation.note = None
    unused = sorted(n for n in raw if n not in program.data)
    if unused:  # a misspelled name, or the wrong file: say so rather than drop them silently
        declared = ", ".join(program.data) or "none"
        print(f"estimax: warning: {data_path} has array{'s' if len(unused) > 1 else ''} that no `data` "
              f"declaration of {program.filename} uses: {', '.join(unused)} (ignored; declared: {declared})",
              file=sys.stderr)
    return data, dims


def _check_data_types(program, raw: dict):
    """Each declared array holds numbers of a kind its declaration can take (no strings, no
    complex numbers; whole numbers for ``int``)."""
    for name, decl in program.data.items():
        if name not in raw:
            continue  # validate_data names what is missing
        a = raw[name]
        declared = _type_text(decl)
        if not (
            np.issubdtype(a.dtype, np.bool_)
            or np.issubdtype(a.dtype, np.integer)
            or np.issubdtype(a.dtype, np.floating)
        ):
            raise program.error(
                f"data {name!r} holds {a.dtype} values; the file declares it {declared}",
                line=decl.line,
                column=1,
                hint="save numbers: real or integer arrays",
            )
        whole = not np.issubdtype(a.dtype, np.floating) or np.all(np.isfinite(a) & (a == np.round(a)))
        if declared.startswith("int") and not whole:
            raise program.error(
                f"data {name!r} holds fractional numbers; the file declares it {declared}",
                line=decl.line,
                column=1,
                hint="declare it real, or save whole numbers",
            )


def _declarations(decls) -> str:
    return ", ".join(f"{d.name}: {_type_text(d)}" for d in decls)


def _type_text(decl) -> str:
    base = "int" if jnp.issubdtype(decl.dtype, jnp.integer) else "real"
    return base + (f"[{', '.join(str(s) for s in decl.shape)}]" if decl.shape else "")


def _leaf_name(path) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k).strip(".[]'\""))
    return ".".join(parts)


def _tree_from_arrays(template, arrays: dict, source: str, prefix: str):
    """``template``'s structure with its leaves read from ``arrays`` by name; an error naming
    what is missing or has another shape or type."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    out = []
    for path, leaf in leaves:
        name = ".".join(p for p in (prefix, _leaf_name(path)) if p)
        if name not in arrays:
            have = sorted(n for n in arrays if n.startswith(prefix))
            raise _Fail(f"{source} has no array {name!r} (it has {', '.join(have) or 'none'})")
        value = arrays[name]
        want_shape, want_dtype = np.shape(leaf), np.asarray(leaf).dtype
        if value.shape != want_shape:
            raise _Fail(f"{source}: {name!r} has shape {list(value.shape)}; expected {list(want_shape)}")
        if value.dtype != want_dtype:
            if not (np.issubdtype(value.dtype, np.floating) and np.issubdtype(want_dtype, np.floating)):
                raise _Fail(f"{source}: {name!r} has type {value.dtype}; expected {want_dtype}")
            value = value.astype(want_dtype)
        out.append(jnp.asarray(value))
    return jax.tree_util.tree_unflatten(treedef, out)

