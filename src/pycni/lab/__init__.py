"""The demo cluster (`pycnictl lab`): model (what it is), build (its pieces), lifecycle (whole-lab
operations the CLI and the tests share), probes (the connectivity matrix), commands (up and down
as the CLI runs them). The arguments are in pycni.ctl.lab."""
