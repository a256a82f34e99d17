"""The fcrun command line (package fcrun_cli)."""
