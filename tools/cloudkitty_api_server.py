"""Serve CloudKitty's API (v1 + v2) on loopback; run by the CloudKitty venv's python.

Usage: ``<venv>/bin/python tools/cloudkitty_api_server.py PORT --config-file F``

The cloudkitty 25.0.0 wheel has no ``cloudkitty-api`` script; its WSGI app
is ``cloudkitty.api.app.build_wsgi_app()``, which reads the configuration
from ``sys.argv``. This serves it with the standard library (a threading
wsgiref server), enough for the reference test stack
(tests/cloudkitty_stack.py). SIGTERM stops it.

``keystonemiddleware.auth_token`` is imported first: it registers the
``[keystone_authtoken]`` options, which the hashmap mapping create/update
calls read even with ``auth_strategy = noauth``
(cloudkitty/common/custom_session.py ``get_request_user``); without it they
fail with ``no such option keystone_authtoken``.
"""

import signal
import sys
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import keystonemiddleware.auth_token  # noqa: F401  (registers [keystone_authtoken])
from cloudkitty.api import app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Handler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        sys.stderr.write("access: %s\n" % (format % args))


def main():
    port = int(sys.argv[1])
    sys.argv = [sys.argv[0]] + sys.argv[2:]
    application = app.build_wsgi_app()
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
