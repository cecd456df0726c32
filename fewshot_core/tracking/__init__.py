"""MLflow tracking with plain client calls, by concern:

* ``store.py``: where MLflow reads and writes (the tracking URI, the local SQLite database built atomically,
  the server environment, the process-wide URI for MLflow's model APIs);
* ``versions.py``: the code version and git commit every run is tagged with;
* ``ui.py``: the MLflow UI address and its run and experiment links;
* ``runs.py``: ``Tracker``, the run layout: one experiment per sweep, one parent run per batch (the code
  location's Dagster run), one child run per evaluation or full-data model.

Plain ``MlflowClient`` calls (no fluent ``mlflow.start_run`` state, no dagster-mlflow hook) so that several
steps of one batch can log into the same parent without sharing process-global state, and a re-logged
evaluation always gets a *new* child run instead of touching an old one.

Each module imports ``mlflow`` (seconds) inside the functions that call it: report links, the UI address and
``fsad ... --help`` import this package without it.
"""
