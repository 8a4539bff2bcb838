"""Stage 1 of the pipeline: images → webdataset tar shards per split (Ray Data), and the readers over them.

`config.IngestConfig` (parameters), `stage.run_ingest` and `stage.KIND` (the stage), `manifest` (manifest.json,
shard checksums), `reader` (training-side loaders: webdataset pipeline, Ray Data dataset, whole-split tensors).
"""
