"""Reference tasks (models, datasets, partitions, run config) shared by client and server."""
