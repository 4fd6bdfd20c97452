"""Serve Gnocchi's REST API on loopback; run by the Gnocchi venv's python.

Usage: ``<venv>/bin/python tools/gnocchi_api_server.py PORT --config-file F``

The gnocchi 4.7.1 wheel's ``gnocchi-api`` execs uwsgi, which is not
installed; its WSGI app is ``gnocchi.cli.api.wsgi()`` (what
``gnocchi.rest.wsgi`` builds for uwsgi), which reads the configuration from
``sys.argv``. This serves it with the standard library (a threading wsgiref
server), enough for the tests (tests/gnocchi_server.py). SIGTERM stops it.
"""

from wsgi_serve import serve, take_port  # tools/, the script's directory


def main():
    port = take_port()
    from gnocchi.cli import api

    serve(port, api.wsgi())


if __name__ == "__main__":
    main()
