"""Serve Keystone's WSGI application on loopback, for the tests.

Run by the Python of tools/keystone_venv.py's virtualenv (never by ours)::

    OS_KEYSTONE_CONFIG_FILES=keystone.conf python keystone_wsgi_server.py PORT_FILE [PORT]

Keystone is imported first (the slow part, about a second); then a threaded
``wsgiref`` server binds 127.0.0.1:PORT (default: a free port, so that the
caller never races another process for one; a restart asks for the port it
had) and the port number is written
to PORT_FILE (through a rename, so a reader never sees half of it): the
caller learns the port without racing another process for it. Requests are
logged to stderr, one line each. SIGTERM stops the process.
"""

import os
import socketserver
import sys
from wsgiref import simple_server


class ThreadingWSGIServer(socketserver.ThreadingMixIn, simple_server.WSGIServer):
    """wsgiref's server, one thread per connection."""

    daemon_threads = True
    allow_reuse_address = True


class QuietHandler(simple_server.WSGIRequestHandler):
    """One short line per request on stderr (no reverse DNS lookups)."""

    def address_string(self):
        return self.client_address[0]


def main():
    port_file = sys.argv[1]
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    sys.argv[1:] = []           # Keystone parses the command line as its own
    from keystone.wsgi.api import application  # reads OS_KEYSTONE_CONFIG_FILES

    server = simple_server.make_server("127.0.0.1", port, application,
                                       server_class=ThreadingWSGIServer,
                                       handler_class=QuietHandler)
    tmp = port_file + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(str(server.server_address[1]))
    os.rename(tmp, port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
