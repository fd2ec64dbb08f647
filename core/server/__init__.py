"""The dagfusion job server: a persistent queue of workflows behind an HTTP API.

``dagfusion serve`` starts it (:func:`dagfusion.server.serve.serve`); :mod:`dagfusion.client`
talks to it. Parts, one job each: :mod:`~dagfusion.server.store` (SQLite queue, history and
event log), :mod:`~dagfusion.server.scheduler` (queued jobs to free slots),
:mod:`~dagfusion.server.executor` (the interface to what runs jobs) and
:mod:`~dagfusion.server.processes` (local worker processes), :mod:`~dagfusion.server.service`
(submission checks), :mod:`~dagfusion.server.app` and :mod:`~dagfusion.server.guard` (HTTP),
:mod:`~dagfusion.server.state` (token, lock and address files). Importing this package imports
no web framework; :mod:`~dagfusion.server.app` needs the ``serve`` extra.
"""
