"""NetworkPolicy enforcement's pure core: objects in, one node's desired rules out.

* ``objects``: Namespaces, Pods, NetworkPolicies, parsed and validated from their Kubernetes
  JSON form; invalid ones become ``Problem`` entries, never exceptions.
* ``selectors``: label selectors and the peer selector rules.
* ``engine``: ``compile_node`` -> ``NodePolicy``, the rules and named sets one node enforces.
* ``evaluate``: an independent reference evaluator, ``allowed(...)``, from the API's wording.
* ``interpret``: answers the same question from compiled ``NodePolicy`` outputs.

No kernel, no API client: the agent feeds it objects and renders what it returns.
"""

from pycni.policy.engine import NodePolicy, compile_inventory, compile_node
from pycni.policy.evaluate import Evaluator, allowed
from pycni.policy.interpret import Interpreter
from pycni.policy.objects import Inventory, Namespace, NetworkPolicy, Node, Pod, Problem, load

__all__ = [
    "Evaluator",
    "Interpreter",
    "Inventory",
    "Namespace",
    "NetworkPolicy",
    "Node",
    "NodePolicy",
    "Pod",
    "Problem",
    "allowed",
    "compile_inventory",
    "compile_node",
    "load",
]
