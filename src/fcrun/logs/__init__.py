"""Instance logs: bounded, size-rotated files on disk, written outside the instance's cgroup.

- ``files``: where logs live and the settings bounding them (LogSettings);
- ``rotation``: RotatingLog and the writer process's loop (stamps lines, rotates by size);
- ``writer``: the log writer process an instance's stdout/stderr pipe drains into;
- ``reader``: tail, since, follow across rotation, and merging several instances by time;
- ``serverlog``: the lines of fcrun's own daemons (text/JSON) and serve's access log.
"""
