"""CEL in workflow definitions and tool specs: parsing and static cost (``expressions``, ``cost``), and
evaluation from async code (``evaluation``), in-process when cheap or in the killable ``sandbox``."""
