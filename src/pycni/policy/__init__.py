"""NetworkPolicy enforcement's pure core: objects in, one node's desired rules out.

* ``objects``: Namespaces, Pods, NetworkPolicies, parsed and validated from their Kubernetes
  JSON form; invalid ones become ``Problem`` entries, never exceptions.
* ``selectors``: label selectors and the peer selector rules.

No kernel, no API client: the agent feeds it objects and renders what it returns.
"""

from pycni.policy.objects import Inventory, Namespace, NetworkPolicy, Node, Pod, Problem, load

__all__ = ["Inventory", "Namespace", "NetworkPolicy", "Node", "Pod", "Problem", "load"]
