"""I/O around the sans-I/O engine: sockets, the event loop, (later) TUN and UAPI."""
