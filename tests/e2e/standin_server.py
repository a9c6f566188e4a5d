"""What the HTTP stand-ins (the ownership registry, the device registry, the web app's auth
backend) share: a threaded HTTP server on loopback in a daemon thread, optionally speaking
only TLS to clients with a certificate its CA signed (mTLS, as a registry that knows the sidecar
by its certificate); its port; its stop; and a request's Bearer token and client CN."""

import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that keeps the test output clean and reads how the caller
    authenticated."""

    def log_message(self, *args):
        pass

    def bearer_token(self):
        auth = self.headers.get("authorization") or ""
        return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

    def peer_cn(self):
        """The client certificate's CN (None over plain HTTP)."""
        peer = getattr(self.connection, "getpeercert", None)
        cert = peer() if peer else None
        if not cert:
            return None
        return dict(x[0] for x in cert["subject"]).get("commonName")


class StandinServer:
    """Base of the stand-ins. `tls`: {"cert", "key", "client_ca"} or None (plain HTTP)."""

    tls = None
    _server = None

    def serve(self, handler):
        """Starts serving with `handler` (a QuietHandler subclass); returns self."""
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.tls["cert"], self.tls["key"])
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(self.tls["client_ca"])
            self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def port(self):
        return self._server.server_address[1]

    def stop(self):
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
