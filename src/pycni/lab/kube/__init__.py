"""`pycnictl lab up --kubernetes`: a real Kubernetes cluster in the lab's namespaces.

    <prefix>-cp      etcd, kube-apiserver, kube-controller-manager, kube-scheduler (192.0.2.253)
    <prefix>-nodeI   containerd, kubelet and kube-proxy of node I (its own mount namespace too),
                     and pycni's DaemonSet pod, applied with kubectl as an operator does

pki.py makes the certificates, controlplane.py starts the control plane, node.py a node's
daemons, addons.py applies pycni and CoreDNS, lifecycle.py brings it all up and down, e2e.py
runs the upstream e2e binary. The binaries and images are `./dev kube`'s (harness/kube.py).
"""
