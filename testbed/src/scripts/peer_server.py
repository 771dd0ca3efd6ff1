"""Testbed server: answers every TCP connection with `peer=<ip>:<port>` (the address it saw)."""
import socket
import socketserver
import sys


class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        host, port = self.client_address[:2]
        if host.startswith("::ffff:"):
            host = host[len("::ffff:"):]
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        print(f"peer={shown}", file=sys.stderr, flush=True)
        self.request.sendall(f"peer={shown}\n".encode())


class Server(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 256

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


if __name__ == "__main__":
    Server(("::", int(sys.argv[1])), Handler).serve_forever()
