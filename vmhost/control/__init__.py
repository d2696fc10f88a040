"""The control socket: the Go-compatible wire, connections, the server and its streams."""
