"""Several hosts (issue 15, docs/cluster.md): compute nodes and the front proxies before them.

placement.py: which node takes a new instance of an app, from the nodes' free resources (pure).
node.py: what a node's serve does for the cluster: heartbeats with its figures, moves in and out.
front.py: the front's router: Host -> app -> a node holding an instance, or a new placement.
front_server.py: ``fcrun serve --role front``: that router behind the proxy, its CMDB caches.
"""
