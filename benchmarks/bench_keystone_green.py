"""How keystoneauth1 (requests) can run beside the GreenPool without monkey patching.

Not a test. Five concurrent calls, each a request to a local server that
answers after ``--delay`` seconds, from cloudkitty_proc's GreenPoolExecutor,
while a green "ticker" counts how often the hub ran it::

    python benchmarks/bench_keystone_green.py [--delay 1.0] [--calls 5]

Ways compared (cloudkitty_proc/keystone_auth.py picks tpool):

* plain: keystoneauth1's session called in the green thread: the hub is
  blocked, the calls run one after the other;
* tpool: the same call through ``eventlet.tpool.execute`` (a real thread);
* import_patched: requests imported through ``eventlet.import_patched``
  after requests and urllib3 are purged from ``sys.modules`` (green, but
  keystoneauth1 then no longer recognises that copy's exceptions: the
  refused connection at the end shows it).

Figures on the development machine (2 vCPUs), 5 calls of 1 s: plain 5.0 s
(ticker 1), tpool 1.0 s (ticker 21), import_patched 1.0 s (ticker 20) but
a refused connection escapes as requests.exceptions.ConnectionError.
"""

from __future__ import annotations

import argparse
import http.server
import socketserver
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloudkitty_proc.executor import GreenPoolExecutor  # noqa: E402


class _Slow(http.server.BaseHTTPRequestHandler):
    delay = 1.0

    def do_GET(self):  # noqa: N802 - http.server's name
        time.sleep(self.delay)
        body = b"{}"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def run(name: str, fn, calls: int) -> None:
    import eventlet

    pool = GreenPoolExecutor(calls + 1)
    ticks = [0]

    def tick():
        while True:
            ticks[0] += 1
            eventlet.sleep(0.05)

    ticker = eventlet.spawn(tick)
    started = time.monotonic()
    for handle in [pool.submit(fn) for _ in range(calls)]:
        handle.result()
    took = time.monotonic() - started
    ticker.kill()
    print(f"{name:15s} {calls} calls in {took:5.2f} s, the ticker ran {ticks[0]} times")


def green_requests():
    """requests and urllib3 imported once more through import_patched."""
    import eventlet

    prefixes = ("requests", "urllib3")
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in prefixes}
    for k in saved:
        del sys.modules[k]
    try:
        return eventlet.import_patched("requests")
    finally:
        for k in [k for k in sys.modules if k.split(".")[0] in prefixes]:
            del sys.modules[k]
        sys.modules.update(saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay", type=float, default=1.0)
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    _Slow.delay = args.delay
    server = _Server(("127.0.0.1", 0), _Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"

    from eventlet import tpool
    from keystoneauth1 import exceptions as ksa_exc
    from keystoneauth1 import session as ksa_session

    plain = ksa_session.Session()
    run("plain", lambda: plain.get(url, authenticated=False), args.calls)
    run("tpool", lambda: tpool.execute(plain.get, url, authenticated=False), args.calls)
    green = ksa_session.Session(session=green_requests().Session())
    run("import_patched", lambda: green.get(url, authenticated=False), args.calls)
    for name, session in (("plain", plain), ("import_patched", green)):
        try:
            session.get("http://127.0.0.1:1/", authenticated=False)
        except ksa_exc.ConnectFailure:
            print(f"{name:15s} refused connection -> keystoneauth1 ConnectFailure")
        except Exception as exc:  # noqa: BLE001 - what escapes is the point
            print(f"{name:15s} refused connection -> {type(exc).__module__}."
                  f"{type(exc).__name__} (not keystoneauth1's)")
    server.shutdown()


if __name__ == "__main__":
    main()
