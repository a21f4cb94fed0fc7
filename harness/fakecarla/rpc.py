"""msgpack-rpc over TCP, the way rpclib (CARLA's RPC library) speaks it.

A request is ``[0, msgid, method, params]`` and a reply ``[1, msgid, error, result]``, one
msgpack object after another on the stream, no framing. CARLA puts its metadata
(``[is_async]``) in ``params[0]``; the dispatcher gets the remaining arguments.

Each connection gets one thread that handles its requests in order, like the single game
thread of the real server. A handler may return ``NO_REPLY`` to leave a call unanswered
(the client then times out on it, and the connection stays usable).
"""

import logging
import socket
import threading

import msgpack

log = logging.getLogger("fakecarla.rpc")

NO_REPLY = object()


def listening_socket(port):
    """A TCP socket listening on 127.0.0.1 (only), as the fake's RPC and streaming servers use."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    return sock


class RpcError(Exception):
    """Raised by a handler to send an rpclib-level error (the client sees rpc_error)."""


class RpcServer:
    def __init__(self, port, dispatch, answer=True, after_reply=None):
        """dispatch(method, args) -> result; answer=False accepts and never replies;
        after_reply() runs after each reply has been written."""
        self.dispatch = dispatch
        self.after_reply = after_reply
        self.answer = answer
        self.sock = listening_socket(port)
        self.port = self.sock.getsockname()[1]
        self._conns = set()
        self._lock = threading.Lock()
        self._closed = False

    def start(self):
        threading.Thread(target=self._accept_loop, name="rpc-accept", daemon=True).start()

    def close(self):
        self._closed = True
        try:
            self.sock.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept_loop(self):
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="rpc-conn", daemon=True).start()

    def _serve(self, conn):
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        send_lock = threading.Lock()
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                if not self.answer:
                    continue
                unpacker.feed(data)
                for msg in unpacker:
                    self._handle(conn, send_lock, msg)
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _handle(self, conn, send_lock, msg):
        if not isinstance(msg, (list, tuple)) or len(msg) < 3:
            return
        if msg[0] == 2:  # notification: [2, method, params]
            method, params, msgid = msg[1], msg[2], None
        elif msg[0] == 0 and len(msg) == 4:
            msgid, method, params = msg[1], msg[2], msg[3]
        else:
            return
        args = list(params[1:]) if params else []
        err, result = None, None
        try:
            result = self.dispatch(method, args)
        except RpcError as exc:
            err = str(exc)
        except Exception as exc:  # a bug in the fake: report it as an rpc error
            log.exception("handler %s failed", method)
            err = f"fakecarla: {method}: {exc!r}"
        if result is NO_REPLY or msgid is None:
            return
        payload = msgpack.packb([1, msgid, err, result], use_bin_type=True)
        with send_lock:
            conn.sendall(payload)
        if self.after_reply is not None:
            self.after_reply()
