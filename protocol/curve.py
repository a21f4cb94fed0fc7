"""The wire across hosts: TCP endpoints, and CurveZMQ wherever one leaves loopback.

The learner binds a TCP endpoint as well as its ipc ones when ``learner.listen`` names one
(``tcp://HOST:PORT``: steps on PORT, weights and progress on PORT+1). Off loopback that needs
an "ironhouse": the learner's key pair (``learner.curve_key``) and a directory of the public keys
of the hosts allowed to connect (``learner.curve_clients``), checked by ZeroMQ's authenticator
(ZAP); a host's workers connect with their own key pair (``workers.curve_key``) and the learner's
public key (``workers.learner_key``). ``supervisor keys NAME`` writes a pair in ZeroMQ's
certificate format: ``NAME.key`` (public, the one to copy) and ``NAME.key_secret``, both 0600.

Keys travel only as file paths: no key is logged, put in a heartbeat, an event or ``status``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
import threading
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
ZAP_DOMAIN = "rlstack"
# The largest CurveZMQ handshake command a client sends (INITIATE: 257 bytes and its metadata): a socket's
# message size limit applies to the handshake too, so a CurveZMQ PUB takes this much instead of a subscription's.
CURVE_HANDSHAKE_BYTES = 1024
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


class KeyFileError(ValueError):
    """A key file that cannot serve: missing, unreadable, open to others, or not a key (the message names it)."""


def parse_tcp(endpoint: str, what: str) -> tuple[str, int]:
    """``tcp://HOST:PORT`` -> (host, port), the port leaving room for PORT+1; ValueError naming ``what``."""
    if not isinstance(endpoint, str) or not endpoint.startswith("tcp://"):
        raise ValueError(f"{what} {endpoint!r} is not tcp://HOST:PORT")
    try:
        parts = urlsplit(endpoint)
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or port is None or parts.path or not 1 <= port <= 65534:
        raise ValueError(f"{what} {endpoint!r} is not tcp://HOST:PORT with a port from 1 to 65534 (PORT+1 is the "
                         "weights port)")
    return host, port


def tcp_endpoints(endpoint: str) -> dict[str, str]:
    """The steps and weights endpoints of a learner's ``tcp://HOST:PORT``."""
    host, port = parse_tcp(endpoint, "endpoint")
    host = f"[{host}]" if ":" in host else host
    return {"steps": f"tcp://{host}:{port}", "weights": f"tcp://{host}:{port + 1}"}


def is_loopback(endpoint: str) -> bool:
    """Whether a tcp endpoint's host is this machine's loopback (127.0.0.0/8, ::1, localhost). Any other name
    counts as off loopback: it may resolve anywhere."""
    host, _ = parse_tcp(endpoint, "endpoint")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- key files ------------------------------------------------------------------------------------------------

def write_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """A new key pair as ``DIR/NAME.key`` and ``DIR/NAME.key_secret`` (both 0600, never over an existing file)."""
    import zmq

    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"key name {name!r}: a plain file name is needed")
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    public_path, secret_path = directory / (name + PUBLIC_SUFFIX), directory / (name + SECRET_SUFFIX)
    for path in (public_path, secret_path):
        if path.exists():
            raise FileExistsError(f"{path} exists; keys are never overwritten (pick another name or move it away)")
    public, secret = zmq.curve_keypair()
    made = datetime.now(timezone.utc).isoformat(timespec="seconds")
    _write_private(secret_path, f"#   ZeroMQ CURVE **Secret** Certificate ({made}): keep it on this host, 0600\n"
                                f"metadata\ncurve\n    public-key = \"{public.decode()}\"\n"
                                f"    secret-key = \"{secret.decode()}\"\n")
    _write_private(public_path, f"#   ZeroMQ CURVE Public Certificate ({made}): copy it to the peer that allows "
                                f"this host\nmetadata\ncurve\n    public-key = \"{public.decode()}\"\n")
    return public_path, secret_path


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _read_keys(path: Path, what: str) -> tuple[bytes | None, bytes | None]:
    try:
        text = Path(path).read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{what} {path} does not exist (write a pair with `supervisor keys NAME`)") from None
    except OSError as exc:
        raise KeyFileError(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
    public = secret = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(b"public-key"):
            public = line.split(b"=", 1)[1].strip(b" \t'\"")
        elif line.startswith(b"secret-key"):
            secret = line.split(b"=", 1)[1].strip(b" \t'\"")
    import zmq
    from zmq.utils import z85

    for key in (public, secret):
        try:
            if key is not None and len(z85.decode(key)) != 32:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise KeyFileError(f"{what} {path} holds no valid CurveZMQ key (a Z85 key is 40 characters)") from None
    if public is not None and secret is not None and zmq.curve_public(secret) != public:
        raise KeyFileError(f"{what} {path}: its public key is not the secret key's (write a new pair with "
                           "`supervisor keys NAME`)")
    return public, secret


def load_secret(path: Path, what: str) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file that only its owner can read."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError:
        mode = 0
    if stat.S_ISDIR(mode):
        raise KeyFileError(f"{what} {path} is a directory; it names the NAME{SECRET_SUFFIX} file")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"{what} {path} can be read by others (mode {stat.S_IMODE(mode):o}); chmod 600 {path}")
    public, secret = _read_keys(path, what)
    if public is None or secret is None:
        raise KeyFileError(f"{what} {path} is not a secret key file (NAME{SECRET_SUFFIX} from `supervisor keys`)")
    return public, secret


def load_public(path: Path, what: str) -> bytes:
    public, _ = _read_keys(Path(path), what)
    if public is None:
        raise KeyFileError(f"{what} {path} holds no public key")
    return public


def key_name(path: Path) -> str:
    """The name a key file was written under (``supervisor keys NAME``): ``keys/host-b.key_secret`` -> host-b."""
    name = Path(path).name
    for suffix in (SECRET_SUFFIX, PUBLIC_SUFFIX):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def key_admits(key: str, host: str) -> bool:
    """Whether workers of ``host`` may come in with the key named ``key``: its own host (``key``), or one of the
    hosts that share it (``key.SUB``: a fleet's hosts are ``KEY.host-N``, wherever Ray placed host-N)."""
    return host == key or (host.startswith(key + ".") and len(host) > len(key) + 1)


def allowed_keys(directory: Path, what: str) -> dict[bytes, str]:
    """The public keys (``*.key``) of a directory of allowed clients, each with its host's name (the file's, as
    ``supervisor keys NAME`` wrote it): a host's workers must call themselves ``NAME:worker-N``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise KeyFileError(f"{what} {directory} is not a directory of public keys")
    keys = {load_public(p, what): key_name(p) for p in sorted(directory.glob("*" + PUBLIC_SUFFIX))}
    names = sorted(keys.values())
    for name in names:  # a key named KEY lets in KEY.SUB too (hosts sharing it): no other key may be named so
        under = next((other for other in names if other != name and key_admits(other, name)), None)
        if under is not None:
            raise KeyFileError(f"{what} {directory}: {name}{PUBLIC_SUFFIX}'s name falls under {under}{PUBLIC_SUFFIX}'s "
                               f"(a key named {under} lets in {under}.*, so {under}'s holder could send as {name}): "
                               "rename one of them")
    return keys


# -- sockets ---------------------------------------------------------------------------------------------------

# A TCP peer that connects and never finishes its handshake is cut off after this long (ZeroMQ's default is 30 s:
# a flood of silent connections would hold that many file descriptors).
HANDSHAKE_MS = 2000


def prepare_tcp(sock, endpoint: str) -> None:
    """Options every TCP socket of the wire carries, before it binds or connects: IPv6 when the endpoint's host is
    an IPv6 address, and a short handshake deadline."""
    host, _ = parse_tcp(endpoint, "endpoint")
    if ":" in host:
        sock.ipv6 = True
    sock.handshake_ivl = HANDSHAKE_MS


def raise_open_files_limit() -> None:
    """Raise this process's soft limit on open files to its hard one (a listening learner holds one per peer)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def serve_curve(sock, public: bytes, secret: bytes) -> None:
    """Make a socket, before it binds, a CurveZMQ server whose clients ZAP checks."""
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_server = True
    sock.zap_domain = ZAP_DOMAIN.encode()


def connect_curve(sock, public: bytes, secret: bytes, server_public: bytes) -> None:
    """Make a socket, before it connects, a CurveZMQ client of the server with that public key."""
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_serverkey = server_public


class Gatekeeper:
    """ZeroMQ's authenticator (ZAP, in a thread of its own) for the learner's TCP sockets: it lets in the clients
    whose public keys are in the allowed directory, under the names of their key files, and counts the ones it turns
    away (``on_refused`` hears the count)."""

    def __init__(self, ctx, allowed: dict[bytes, str] | set[bytes], on_refused=None):
        """``allowed``: the public keys let in, each with the name its messages then carry (``Message.peer``)."""
        from zmq.auth.thread import ThreadAuthenticator
        from zmq.utils import z85

        names = allowed if isinstance(allowed, dict) else dict.fromkeys(allowed, "")

        gate = self
        quiet = logging.getLogger("rlstack.curve")  # ZAP's own log names keys: it goes nowhere
        if not quiet.handlers:
            quiet.addHandler(logging.NullHandler())
        quiet.propagate = False

        class Counting(ThreadAuthenticator):
            async def _authenticate_curve(self, domain, client_key):
                ok, reason = await super()._authenticate_curve(domain, client_key)
                if not ok:
                    gate._refuse()
                return ok, reason

            def curve_user_id(self, client_public_key):
                return names.get(z85.encode(client_public_key), "")

        self.refused = 0
        self._lock = threading.Lock()
        self.on_refused = on_refused
        self.auth = Counting(ctx, log=quiet)
        self.auth.start()
        self.auth.certs[ZAP_DOMAIN] = dict.fromkeys(names, True)

    def _refuse(self) -> None:
        with self._lock:
            self.refused += 1
        if self.on_refused is not None:
            try:
                self.on_refused(self.refused)
            except Exception:  # noqa: BLE001 (the ZAP thread must answer every handshake whatever a report does)
                pass

    def stop(self) -> None:
        self.auth.stop()
