"""The spawner: a small single-threaded process that forks containers for the library.

- protocol.py: the messages, their framing, and the re-check of every request;
- server.py: the spawner process (`main`), its warm children, and why it exists;
- client.py: the library's side: `Client` (one spawner) and `SharedSpawner` (this
  process's, started on demand; `for_create` decides whether a creation uses it).

Nothing is imported here: the spawner process imports `fcrun.runtime.spawner.server` and
must not pay for the client (nor the client's at-exit and at-fork hooks).
"""
