"""Tools: the registry and specs, the one guarded path every call takes (``calls``), the executors
(``builtins``, ``http_executor``), redaction of what is recorded, and the shared circuit breakers."""
