"""pycni's plugin executable in C (shim.c, package data) and how it is built (build.py)."""

# In every native executable pycnictl builds: how install and uninstall know it is pycni's.
MARKER_PREFIX = b"pycni native shim "
# The Python launcher a native executable built without --standalone execs when no agent
# listens: hidden beside it in the bin dir (runtimes look plugins up by name, never list).
FALLBACK_NAME = ".pycni.inproc"
