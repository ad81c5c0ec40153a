"""HTTP routes, Socket.IO events, static files and middlewares."""
