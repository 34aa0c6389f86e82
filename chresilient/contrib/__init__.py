"""Glue for web frameworks (``chresilient.contrib.flask``)."""
