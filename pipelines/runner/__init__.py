"""Our small DAG executor on Ray: execute.py schedules stages as Ray tasks (task.py), runs.py keeps the MLflow
parent/nested runs. Stage outputs live where pipelines.storage puts them."""
