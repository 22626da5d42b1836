"""The bulk path: large slices on a second listener, read straight into their tensors.

gRPC's Python receive path copies every message out of the core into a Python `bytes` (about
0.3 s of a core per 256 MiB, BENCHMARKS.md "The wire at 256 MiB"). A slice whose payload
reaches `--bulk-threshold` travels instead on its own TCP connection to this listener, with TLS
and mutual authentication by the same certificates and CA as gRPC, and its bytes land by
`recv_into` in the tensors the decoder allocated: no copy after the kernel's (or TLS's).

Framing, one slice per connection:
- the client sends MAGIC, then frames: a 4-byte little-endian length and that many bytes of a
  `SliceFrame` protobuf, the `start` header first, then per tensor its `tensor` header followed
  by exactly its `nbytes` raw little-endian bytes, unframed;
- the server answers with a reply: a gRPC status code (u32, 0 for OK), the payload bytes it
  took (u64), and a UTF-8 detail (u32 length, then the text).
The frames pass the same `StreamDecoder` as a gRPC push (protocol, cluster, fingerprint, the
header against the sender's plan, dtypes, shapes, sizes, CRC-32, finiteness) and the decoded
slice goes to the same `PeerHost.accept_slice`; with TLS, the client certificate must be a
device certificate naming the header's sender, as PushSlices requires.

A listener facing a LAN: at most MAX_CONNECTIONS at once (more are closed at once), the TLS
handshake and the header within HANDSHAKE_TIMEOUT_S, at most IDLE_TIMEOUT_S without a byte
afterwards, a frame of at most MAX_FRAME_BYTES (read only after its length is checked), the
payload bounded by the plan before any tensor is allocated. A refused or broken connection is
closed and counted; nothing from it reaches the model.

Receiving runs on threads (one per connection, blocking sockets with timeouts); only the
header check, the end of a stream and the hand-over run on the event loop, as short calls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import grpc
import torch
from cryptography import x509

from peerd.net import DEFAULT_BULK_THRESHOLD
from peerd.net.codec import (
    CHECK_POOL,
    StreamDecoder,
    WireError,
    encode_frames,
    payload_bytes,
)
from peerd.net.limits import HANDSHAKE_TIMEOUT_S, PortInUse
from peerd.net.service import REFUSAL_LOG_INTERVAL_S, PeerHost
from peerd.net.tls import TlsIdentity
from peerd.ops.ca import DEVICE_CERT, DEVICE_KEY, DEVICE_ROLE, certificate_name, certificate_role
from peerd.v1 import peer_pb2

log = logging.getLogger("peerd.bulk")

T = TypeVar("T")

MAGIC = b"peerd-bulk/1\n"
# A frame is a stream or tensor header: unit lists of a large model's plan take tens of KiB.
MAX_FRAME_BYTES = 1 << 20
# Slices arrive from a handful of neighbours per round; a LAN cluster is tens of peers.
MAX_CONNECTIONS = 64
# A transfer that stalls this long (no byte either way) is dropped; the sender retries.
IDLE_TIMEOUT_S = 30.0
MAX_DETAIL_BYTES = 1024
# The sender hands the kernel this much of a tensor per call.
SEND_BYTES = 16 << 20
_LENGTH = struct.Struct("<I")
_REPLY = struct.Struct("<IQI")
# Short calls onto the event loop (the header check, the hand-over) wait at most this long.
LOOP_CALL_TIMEOUT_S = 30.0


class BulkUnreachable(WireError):
    """The bulk listener could not be reached, or the connection broke before its answer."""

    def __init__(self, detail: str) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, detail)


@dataclass
class BulkCounters:
    """What the listener did, for tests and logs."""

    accepted: int = 0
    refused: int = 0  # closed at once: over MAX_CONNECTIONS
    failed: int = 0  # broken, timed out or refused mid-way (a stranger, a bad frame)
    slices: int = 0  # handed to the host


BULK_RPC = "BulkPush"  # the `rpc` label of refusals on the bulk listener


class BulkServer:
    """The bulk listener of one daemon, handing checked slices to `host` on `loop`."""

    def __init__(self, host: PeerHost, tls: TlsIdentity | None,
                 loop: asyncio.AbstractEventLoop, max_connections: int = MAX_CONNECTIONS,
                 handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
                 idle_timeout_s: float = IDLE_TIMEOUT_S,
                 on_reject: Callable[[str, str], None] | None = None) -> None:
        self.host = host
        # (rpc, status code name) of every refused slice but "not yet", as PeerService counts
        # gRPC's: for the metrics endpoint.
        self.on_reject = on_reject
        self.loop = loop
        self.max_connections = max_connections
        self.handshake_timeout_s = handshake_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.counters = BulkCounters()
        self._tls_context = _server_context(tls) if tls is not None else None
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._senders_heard: set[str] = set()  # members only: their slices passed the plan
        self._refusal_logged_at = -REFUSAL_LOG_INTERVAL_S
        self._refusals_unlogged = 0
        self.port = 0

    def start(self, bind_host: str, port: int = 0) -> int:
        """Listen on `bind_host:port` (0: any free port); returns the port."""
        family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((bind_host, port))
        except OSError as error:
            listener.close()
            raise PortInUse(f"cannot listen for bulk transfers on {bind_host}:{port}: "
                            f"{error.strerror}; choose another --bulk-port") from None
        listener.listen(self.max_connections)
        self._listener = listener
        self.port = listener.getsockname()[1]
        accepting = threading.Thread(target=self._accept_forever, name="peerd-bulk-accept",
                                     daemon=True)
        accepting.start()
        self._threads.append(accepting)
        log.info("bulk listener on %s:%d (%s)", bind_host, self.port,
                 "mutual TLS" if self._tls_context is not None else "no TLS")
        return self.port

    def stop(self) -> None:
        """Close the listener and every connection; waits for their threads."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=self.handshake_timeout_s)

    def _accept_forever(self) -> None:
        while (listener := self._listener) is not None:
            try:
                connection, _ = listener.accept()
            except OSError:
                return  # closed by stop()
            with self._lock:
                full = len(self._connections) >= self.max_connections
                if not full:
                    self._connections.add(connection)
                    self._threads = [t for t in self._threads if t.is_alive()]
            if full:
                self.counters.refused += 1
                connection.close()
                continue
            thread = threading.Thread(target=self._serve, args=(connection,),
                                      name="peerd-bulk", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # no thread to be had: refuse this one, keep accepting
                with self._lock:
                    self._connections.discard(connection)
                self.counters.refused += 1
                connection.close()
                continue
            self.counters.accepted += 1
            self._threads.append(thread)

    def _serve(self, raw: socket.socket) -> None:
        connection: socket.socket = raw
        peer = "?"
        try:
            host, port = raw.getpeername()[:2]
            peer = f"{host}:{port}"
            raw.settimeout(self.handshake_timeout_s)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls_context is not None:
                connection = self._tls_context.wrap_socket(raw, server_side=True)
            self._receive(connection, _client_name(connection))
        except (OSError, EOFError) as error:  # ssl.SSLError and timeouts are OSErrors
            self.counters.failed += 1
            log.debug("bulk connection from %s dropped: %s", peer, error or type(error).__name__)
        finally:
            with self._lock:
                self._connections.discard(raw)
            connection.close()

    def _receive(self, connection: socket.socket, client_name: str | None) -> None:
        """One slice: frames into the decoder, tensor bytes straight into its buffers, then
        the reply. A refusal is answered with its code and detail before the close."""
        decoder = StreamDecoder(self.host.expectation, check_pool=CHECK_POOL)
        try:
            try:
                if _read_exactly(connection, len(MAGIC)) != MAGIC:
                    raise WireError(grpc.StatusCode.INVALID_ARGUMENT,
                                    "not a peerd bulk stream (wrong preamble)")
                start = _read_frame(connection)
                if start.WhichOneof("body") != "start":
                    raise WireError(grpc.StatusCode.INVALID_ARGUMENT,
                                    "a bulk stream must open with a start header")
                _check_claim(client_name, start.start.sender)
                # The header is checked against the plans on the loop (the driver's state);
                # the sender waits for the answer before it sends any tensor.
                self._on_loop(decoder.feed, start)
                _send_reply(connection, 0, 0, "")
                connection.settimeout(self.idle_timeout_s)
                for _ in range(start.start.tensors):
                    frame = _read_frame(connection)
                    if frame.WhichOneof("body") != "tensor":
                        raise WireError(grpc.StatusCode.INVALID_ARGUMENT,
                                        "expected a tensor header")
                    decoder.feed(frame)
                    decoder.fill_current(partial_reader(connection))
                decoded = decoder.finish()
                self._on_loop(self.host.accept_slice, decoded)
            except WireError as error:
                self.counters.failed += 1
                if self.on_reject is not None and error.code != grpc.StatusCode.UNAVAILABLE:
                    self.on_reject(BULK_RPC, error.code.name)
                self._log_refusal(client_name, error)
                _send_reply(connection, error.code.value[0], 0, error.detail)
                return
            except (OSError, EOFError):
                raise  # the connection broke: nothing can be answered (_serve counts it)
            except Exception as error:  # a fault on this side: answered as gRPC answers it
                self.counters.failed += 1
                log.warning("bulk slice from %s failed here", client_name or "a client",
                            exc_info=True)
                _send_reply(connection, grpc.StatusCode.UNKNOWN.value[0], 0,
                            f"unexpected {type(error).__name__} on the receiver: {error}")
                return
            self.counters.slices += 1
            if decoded.header.sender not in self._senders_heard:
                self._senders_heard.add(decoded.header.sender)
                log.info("first bulk slice from %s: %d bytes", decoded.header.sender,
                         decoded.payload_bytes)
            _send_reply(connection, 0, decoded.payload_bytes, "")
        finally:
            with contextlib.suppress(RuntimeError):  # the loop closed: nothing to give back
                self.loop.call_soon_threadsafe(decoder.close)

    def _log_refusal(self, client_name: str | None, error: WireError) -> None:
        """"Not yet" (UNAVAILABLE, retried) at DEBUG; other refusals at INFO, at most one line
        per REFUSAL_LOG_INTERVAL_S, so that a misbehaving client cannot flood the journal."""
        who = client_name or "a client"
        if error.code == grpc.StatusCode.UNAVAILABLE:
            log.debug("bulk slice from %s deferred: %s", who, error.detail)
            return
        now = time.monotonic()
        with self._lock:
            if now - self._refusal_logged_at < REFUSAL_LOG_INTERVAL_S:
                self._refusals_unlogged += 1
                return
            unlogged, self._refusals_unlogged = self._refusals_unlogged, 0
            self._refusal_logged_at = now
        log.info("bulk slice from %s refused: %s%s", who, error.detail,
                 f" ({unlogged} more refusals not logged)" if unlogged else "")

    def _on_loop(self, function: Callable[..., T], *args: object) -> T:
        """Run `function(*args)` on the event loop and wait for it. A call still queued after
        LOOP_CALL_TIMEOUT_S never runs (TimeoutError): a header check must not take an inbox
        slot, nor a slice be accepted, after the sender was cut off and sent it again. Queued
        in order with the decoder's close (`call_soon_threadsafe`, no task step between)."""
        result: concurrent.futures.Future[T] = concurrent.futures.Future()

        def call() -> None:
            if not result.set_running_or_notify_cancel():
                return  # timed out while queued
            try:
                result.set_result(function(*args))
            except BaseException as error:  # handed to the waiting thread
                result.set_exception(error)

        self.loop.call_soon_threadsafe(call)
        try:
            return result.result(LOOP_CALL_TIMEOUT_S)
        except TimeoutError:
            if result.cancel():
                raise
            return result.result()  # it began on the loop meanwhile: its outcome stands


def partial_reader(connection: socket.socket) -> Callable[[memoryview], None]:
    """Fills a buffer from `connection` with `recv_into`; EOFError when it closes first."""
    def fill(window: memoryview) -> None:
        received = 0
        while received < window.nbytes:
            count = connection.recv_into(window[received:])
            if count == 0:
                raise EOFError(f"connection closed after {received} of {window.nbytes} bytes")
            received += count
    return fill


def _read_exactly(connection: socket.socket, count: int) -> bytes:
    buffer = bytearray(count)
    partial_reader(connection)(memoryview(buffer))
    return bytes(buffer)


def _read_frame(connection: socket.socket) -> peer_pb2.SliceFrame:
    (length,) = _LENGTH.unpack(_read_exactly(connection, _LENGTH.size))
    if not 0 < length <= MAX_FRAME_BYTES:
        raise WireError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"a frame of {length} bytes; frames hold 1 to {MAX_FRAME_BYTES}")
    try:
        return peer_pb2.SliceFrame.FromString(_read_exactly(connection, length))
    except Exception:  # protobuf's DecodeError and its relatives: the bytes are no frame
        raise WireError(grpc.StatusCode.INVALID_ARGUMENT,
                        f"a frame of {length} bytes is not a SliceFrame") from None


def _send_reply(connection: socket.socket, code: int, payload_bytes: int, detail: str) -> None:
    text = detail.encode()[:MAX_DETAIL_BYTES]
    connection.sendall(_REPLY.pack(code, payload_bytes, len(text)) + text)


def _check_claim(client_name: str | None, sender: str) -> None:
    """With TLS the stream must come from the member its certificate names."""
    if client_name is not None and client_name != sender:
        raise WireError(grpc.StatusCode.PERMISSION_DENIED,
                        f"the client's certificate names {client_name!r} but the stream claims "
                        f"to come from {sender!r}")


def _certificate(connection: socket.socket) -> x509.Certificate | None:
    if not isinstance(connection, ssl.SSLSocket):
        return None
    der = connection.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None


def _client_name(connection: socket.socket) -> str | None:
    """The device name of a TLS client's certificate (verified against the CA by the
    handshake); None without TLS. A certificate of another role is refused."""
    certificate = _certificate(connection)
    if certificate is None:
        return None
    try:
        role = certificate_role(certificate)
        name = certificate_name(certificate)
    except ValueError as error:
        raise ConnectionRefusedError(f"unreadable client certificate: {error}") from None
    if role != DEVICE_ROLE:
        raise ConnectionRefusedError(f"bulk transfers need a device certificate; {name!r} is "
                                     f"{role}")
    return name


def _server_context(tls: TlsIdentity) -> ssl.SSLContext:
    """Serve with the device certificate; require a client certificate from the CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=tls.ca_pem.decode())
    _load_identity(context, tls)
    return context


def _client_context(tls: TlsIdentity) -> ssl.SSLContext:
    """Dial with the device certificate; the server's chain must lead to the CA, and its name
    is compared with the receiver after the handshake (peer ids are not host names)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=tls.ca_pem.decode())
    _load_identity(context, tls)
    return context


def _load_identity(context: ssl.SSLContext, tls: TlsIdentity) -> None:
    context.load_cert_chain(tls.directory / DEVICE_CERT, tls.directory / DEVICE_KEY)


class BulkSender:
    """Pushes slices to peers' bulk listeners; with `tls`, only to a server whose certificate
    names the receiver."""

    def __init__(self, tls: TlsIdentity | None, timeout_s: float = IDLE_TIMEOUT_S,
                 threshold: int = DEFAULT_BULK_THRESHOLD) -> None:
        self._tls_context = _client_context(tls) if tls is not None else None
        self.timeout_s = timeout_s
        self.threshold = threshold

    def takes(self, tensors: Mapping[str, torch.Tensor], bulk_port: int) -> bool:
        """Does a slice of `tensors` go over the bulk path to a peer announcing `bulk_port`?"""
        return bulk_port != 0 and payload_bytes(tensors) >= self.threshold

    async def push(self, host: str, port: int, header: peer_pb2.StreamHeader,
                   tensors: Mapping[str, torch.Tensor]) -> int:
        """Send one slice to `header.receiver` at `host:port`; returns the payload bytes it
        acknowledged. WireError with the receiver's code when it refuses the slice,
        BulkUnreachable when it cannot be reached or the connection breaks."""
        sockets: list[socket.socket] = []
        future = asyncio.get_running_loop().run_in_executor(
            SEND_POOL, self._send, host, port, header, tensors, sockets)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            for connection in sockets:  # the sending thread fails at once and returns
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
            raise

    def _send(self, host: str, port: int, header: peer_pb2.StreamHeader,
              tensors: Mapping[str, torch.Tensor], sockets: list[socket.socket]) -> int:
        where = f"{host}:{port}"
        try:
            raw = socket.create_connection((host, port), timeout=HANDSHAKE_TIMEOUT_S)
        except OSError as error:
            raise BulkUnreachable(f"bulk listener {where}: {error.strerror or error}") from None
        sockets.append(raw)
        connection: socket.socket = raw
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls_context is not None:
                connection = self._tls_context.wrap_socket(raw, server_hostname=None)
                name = _server_name(connection)
                if name != header.receiver:
                    raise WireError(grpc.StatusCode.PERMISSION_DENIED,
                                    f"{where} holds the certificate of {name!r}, not of "
                                    f"{header.receiver!r}")
            connection.settimeout(self.timeout_s)
            frames = encode_frames(header, tensors, SEND_BYTES)
            connection.sendall(MAGIC + _framed(next(frames)))
            code, acknowledged, detail = _read_reply(connection)  # refused, or go on
            if code == 0:
                for frame in frames:
                    connection.sendall(frame if isinstance(frame, memoryview) else _framed(frame))
                code, acknowledged, detail = _read_reply(connection)
        except (OSError, EOFError) as error:
            raise BulkUnreachable(f"bulk transfer to {where} broke: "
                                  f"{error or type(error).__name__}") from None
        finally:
            connection.close()
        if code != 0:
            raise WireError(_status(code), detail)
        return acknowledged


def _framed(frame: peer_pb2.SliceFrame | memoryview) -> bytes:
    assert not isinstance(frame, memoryview)  # headers are framed, tensor bytes follow bare
    body = frame.SerializeToString()
    return _LENGTH.pack(len(body)) + body


def _read_reply(connection: socket.socket) -> tuple[int, int, str]:
    code, payload_bytes, length = _REPLY.unpack(_read_exactly(connection, _REPLY.size))
    detail = _read_exactly(connection, min(length, MAX_DETAIL_BYTES))
    return code, payload_bytes, detail.decode(errors="replace")


def _server_name(connection: socket.socket) -> str | None:
    certificate = _certificate(connection)
    try:
        return certificate_name(certificate) if certificate is not None else None
    except ValueError:
        return None


def _status(code: int) -> grpc.StatusCode:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status
    return grpc.StatusCode.UNKNOWN


# Sending threads: a round pushes to a handful of neighbours at once.
SEND_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=8,
                                                  thread_name_prefix="peerd-bulk-send")
