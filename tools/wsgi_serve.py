"""A threading wsgiref server on loopback, stopped by SIGTERM: what the
tools serving another project's WSGI app use (tools/cloudkitty_api_server.py,
tools/gnocchi_api_server.py), run by that project's venv python. Standard
library only."""

import signal
import sys
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    request_queue_size = 64


class _Handler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        sys.stderr.write("access: %s\n" % (format % args))


def take_port():
    """``PORT`` from ``sys.argv[1]``, the rest left for the app's own
    configuration parsing (``--config-file F``)."""
    port = int(sys.argv[1])
    sys.argv = [sys.argv[0]] + sys.argv[2:]
    return port


def serve(port, application):
    """Serve ``application`` on 127.0.0.1:``port`` until SIGTERM."""
    httpd = make_server("127.0.0.1", port, application,
                        server_class=_Server, handler_class=_Handler)

    def stop(_signum, _frame):
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    sys.stderr.write("serving on http://127.0.0.1:%d\n" % port)
    sys.stderr.flush()
    httpd.serve_forever()
    httpd.server_close()
