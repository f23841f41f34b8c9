"""YADTQ: a distributed task queue for Linux fleets, with Apache Kafka as its transport.

Plugin authors need only :data:`hookimpl`::

    import yadtqd

    @yadtqd.hookimpl
    def yadtq_register_tasks(register):
        register("add", add)

Everything else in this package is the daemon (``yadtqd``), the operator's CLI (``yadtqctl``)
and the client API (:mod:`yadtqd.client`).
"""

import pluggy

__version__ = "0.1.0"

#: Marks a function in a plugin module as an implementation of a hook in :mod:`yadtqd.hookspecs`.
hookimpl = pluggy.HookimplMarker("yadtq")

__all__ = ["__version__", "hookimpl"]
