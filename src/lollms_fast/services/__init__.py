"""Services: the only layer where storage and the engine meet."""
