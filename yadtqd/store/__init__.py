"""The result backend: SQLite in WAL mode. Every SQL statement of YADTQ lives in this package
(the schema in ``yadtqd/schema/``, one numbered script per version):

- :mod:`~yadtqd.store.schema`: opening a database and migrating its schema;
- :mod:`~yadtqd.store.transitions`: the task state machine and what the server's loop reads;
- :mod:`~yadtqd.store.batches`: its intake, grants and successes of many tasks in one statement;
- :mod:`~yadtqd.store.records`: the values the transitions hand back;
- :mod:`~yadtqd.store.reads`: the read-only queries behind the socket's operations;
- :mod:`~yadtqd.store.replica`: the row changes a transaction made, and applying them;
- :mod:`~yadtqd.store.terms`: the active servers' terms (who was active when, and why it ended);
- :mod:`~yadtqd.store.lifecycle`: the operator's cancel, retry and purge, and retention.
"""

from yadtqd.store.replica import RowChange, TableChanges
from yadtqd.store.schema import connect, migrate, migrations, schema_version
from yadtqd.store.records import Grant, Held, Intake, Waiting
from yadtqd.store.transitions import WORKER_LOST, Store, runs_counted

__all__ = ["WORKER_LOST", "Grant", "Held", "Intake", "RowChange", "Store", "TableChanges", "Waiting",
           "connect", "migrate", "migrations", "runs_counted", "schema_version"]
