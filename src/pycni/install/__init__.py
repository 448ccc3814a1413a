"""Putting pycni on a node and taking it off again: the launchers runtimes exec (launchers),
the native executable (native), `pycnictl install` (node), `pycnictl uninstall` (uninstall) and
`pycnictl cleanup` (cleanup). Everything written carries a marker, so nothing else is touched."""
