"""pycni: a Kubernetes pod network in Python."""

__version__ = "0.1.0"
