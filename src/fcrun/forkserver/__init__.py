"""The fork-server: a privileged single-threaded process that creates containers on request
and keeps a pool of pre-warmed, frozen instances per image (FastContainer's cold start in
milliseconds).

- protocol.py: the messages (length-prefixed msgpack) and the re-checking of every request;
- pool.py: pooled instances (warm, freeze, claim, recycle) and ordinary instance starts;
- server.py: the process (`python -m fcrun.forkserver`), its poll loop and socket;
- client.py: Client (blocking), AsyncClient, and serve's Supervisor (start/restart/stop).

From the library::

    from fcrun.forkserver import Client, protocol
    with Client("/run/fcrun/forkserver.sock") as fs:
        print(fs.request(protocol.Status()))
"""

from .client import AsyncClient, Client, ForkServerGone, Supervisor

__all__ = ["AsyncClient", "Client", "ForkServerGone", "Supervisor"]
