"""Serve Gnocchi's REST API on loopback; run by the Gnocchi venv's python.

Usage: ``<venv>/bin/python tools/gnocchi_api_server.py PORT --config-file F``

The gnocchi 4.7.1 wheel's ``gnocchi-api`` execs uwsgi, which is not
installed; its WSGI app is ``gnocchi.cli.api.wsgi()`` (what
``gnocchi.rest.wsgi`` builds for uwsgi), which reads the configuration from
``sys.argv``. This serves it with the standard library (a threading wsgiref
server), enough for the tests (tests/gnocchi_server.py). SIGTERM stops it.
"""

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


def main():
    port = int(sys.argv[1])
    sys.argv = [sys.argv[0]] + sys.argv[2:]
    from gnocchi.cli import api

    application = api.wsgi()
    httpd = make_server("127.0.0.1", port, application,
                        server_class=_Server, handler_class=_Handler)

    def stop(_signum, _frame):
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    sys.stderr.write("serving on http://127.0.0.1:%d\n" % port)
    sys.stderr.flush()
    httpd.serve_forever()
    httpd.server_close()


if __name__ == "__main__":
    main()
