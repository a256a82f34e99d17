"""`fcrun serve`: the reactive HTTP proxy, the instance manager and the admin API in one process."""
