"""Tools: the registry, their specs, and the circuit breakers guarding calls to them."""
