"""All SQL lives in this package. Functions take a ``Session`` and never commit: the caller owns the
transaction (``server.db.transaction``), so several operations compose into one unit of work."""
