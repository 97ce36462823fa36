"""One router per resource: search, items, admin, health (and the web page)."""
