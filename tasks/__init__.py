"""Reference tasks (models, dataset registry) shared by client and server, hence their own package."""
