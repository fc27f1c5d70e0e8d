"""Build script: compiles the Gearman hot path with mypyc when it can.

``atomnode.gearman.protocol``, ``.broker`` and ``.server`` carry every packet of every
job; compiled to C by mypyc they take about 40% less of the server's CPU per round trip
(docs/performance.md, "mypyc"). They stay plain, valid Python: the compiled modules are
built from the same files and sit beside them (an extension module is imported before a
``.py`` of the same name). Where no C compiler or Python headers are available the
extensions are skipped (``optional``) and the same modules run as pure Python;
``ATOMNODE_PURE_PYTHON=1`` skips them on purpose. Everything else is in pyproject.toml.

One extension is plain C: ``atomnode.queue._rowreader`` reads the live jobs at a restart
about twice as fast as the sqlite3 module (its docstring says why; docs/performance.md,
"Restart"). It links the system's libsqlite3 (libsqlite3-dev to build), and recovery uses
the sqlite3 module where it was not built.

Another is ``atomnode.gearman._fastdecode``: the decoder's loop over complete packets,
which takes a sixth of the server's CPU per pipelined job off (docs/performance.md, round
6); the same loop in Python (protocol.Decoder.next_events) serves where it was not built.
And ``atomnode.gearman._busypoll``: the hub's busy poll (config ``busy_poll``), which must
run without the GIL; where it was not built the hub does not spin.
"""

import os

from setuptools import Extension, setup

#: The modules compiled, all on the per-packet path.
HOT_MODULES = [
    "atomnode/gearman/protocol.py",
    "atomnode/gearman/broker.py",
    "atomnode/gearman/server.py",
]


def ext_modules() -> list:
    if os.environ.get("ATOMNODE_PURE_PYTHON") == "1":
        return []
    from mypyc.build import mypycify

    extensions = mypycify(HOT_MODULES, opt_level="3", group_name="atomnode_hot")
    extensions.append(Extension(
        "atomnode.queue._rowreader", ["atomnode/queue/_rowreader.c"], libraries=["sqlite3"],
    ))
    extensions.append(Extension(
        "atomnode.gearman._fastdecode", ["atomnode/gearman/_fastdecode.c"],
    ))
    extensions.append(Extension(
        "atomnode.gearman._busypoll", ["atomnode/gearman/_busypoll.c"],
    ))
    for ext in extensions:
        ext.optional = True  # no compiler: the pure-Python modules serve
    return extensions


setup(ext_modules=ext_modules())
