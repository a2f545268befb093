"""Serving over HTTP: ``retrieval serve`` (supervisor and workers), the app, hot reload, the
load generator. Imported by the CLI only: an app that embeds a ``Retriever`` never loads it."""
