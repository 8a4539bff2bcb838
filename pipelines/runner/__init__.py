"""Our small DAG executor on Ray: execute.py schedules stages as Ray tasks (task.py), runs.py keeps the MLflow
parent/nested runs, storage.py is where stage outputs live (local or pyarrow.fs URIs)."""
