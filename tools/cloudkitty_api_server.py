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

from wsgi_serve import serve, take_port  # tools/, the script's directory

import keystonemiddleware.auth_token  # noqa: F401,E402  (registers [keystone_authtoken])
from cloudkitty.api import app  # noqa: E402


def main():
    port = take_port()
    serve(port, app.build_wsgi_app())


if __name__ == "__main__":
    main()
