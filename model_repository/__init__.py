"""The Triton model repository: config.pbtxt from the model specs, the python-backend models and
the server launcher for machines without Docker."""
