"""SQLite storage: schema and migrations, one writer thread, readers off the event loop."""
