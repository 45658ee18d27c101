"""One file per transformer family."""
