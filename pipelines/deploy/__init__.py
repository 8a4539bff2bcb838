"""The deploy stage: serve the pipeline's model over HTTP with Ray Serve on the current Ray cluster.

config.py     DeployConfig, including `app`: the Serve application builder, by import path
stage.py      KIND: builds the application, starts Serve and runs it (and restores it on a cache hit)
"""
