"""Top floor of safe-retrieval: the HTTP service, its jobs, and the root command line."""
