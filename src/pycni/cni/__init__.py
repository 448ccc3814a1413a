"""The CNI protocol: environment, network config, versions, results and errors."""
