"""Peer discovery: where candidate peers might be, from mDNS and from static `--peer` addresses.

Discovery is only a hint: a candidate is an address worth trying, and liveness and identity
are settled over gRPC by membership. Every source implements `Discovery`, and
`DiscoveryManager` is the one face the daemon sees (as syncthing's discover manager sits
over its LAN and global sources).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from zeroconf import (
    InterfaceChoice,
    IPVersion,
    NonUniqueNameException,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from peerd.state import IDENTIFIER

SERVICE_TYPE = "_peerd._tcp.local."
# DNS allows 63 bytes per label; the instance label adds "-" and 8 hex digits to the peer id.
MAX_MDNS_PEER_ID = 54


def instance_label(peer_id: str, cluster: str) -> str:
    """A peer's mDNS instance and host label: its id tagged with its cluster, so that clusters
    sharing a network may reuse ids (two local clusters both have a peer-00)."""
    return f"{peer_id}-{zlib.crc32(cluster.encode()):08x}"


class DuplicatePeerId(ValueError):
    """Another responder on the network already announces this peer id in this cluster."""
RESOLVE_TIMEOUT_S = 3.0
# Registering (probe + announce, about 1.5 s) and saying goodbye (about 0.5 s) must end by then.
STEP_TIMEOUT_S = 5.0

_PROTOCOL = re.compile(r"[0-9]{1,9}")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?")


def _check_identifier(key: str, value: object) -> str:
    if not isinstance(value, str) or not IDENTIFIER.fullmatch(value):
        raise ValueError(f"{key} must be 1-64 characters of [A-Za-z0-9._-], got {value!r}")
    return value


def _normalize_host(host: str) -> str:
    """An IP literal in its canonical form, or a hostname in lower case; ValueError otherwise."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(host):
        raise ValueError(f"host must be an IP address or a hostname, got {host!r}")
    return host.lower()


def _check_port(port: object) -> int:
    if type(port) is not int or not 1 <= port <= 65535:
        raise ValueError(f"port must be an integer in 1..65535, got {port!r}")
    return port


def format_address(host: str, port: int) -> str:
    """`host:port`, with IPv6 in brackets so that `parse_address` reads it back."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(text: str) -> tuple[str, int]:
    """Read "HOST:PORT" or "[IPV6]:PORT" into a normalized (host, port)."""
    if text.startswith("["):
        host, bracket, port_text = text[1:].partition("]:")
        if not bracket or ":" not in host:
            raise ValueError(f"bad address {text!r}: expected [IPV6]:PORT")
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or not host or ":" in host:
            raise ValueError(f"bad address {text!r}: expected HOST:PORT or [IPV6]:PORT")
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"bad address {text!r}: port {port_text!r} is not a number")
    try:
        return _normalize_host(host), _check_port(int(port_text))
    except ValueError as error:
        raise ValueError(f"bad address {text!r}: {error}") from None


# A TXT string holds 255 bytes, "key=value" together: what is left for the widths' value.
TXT_VALUE_LIMIT = 255 - len("widths=")


@dataclass(frozen=True)
class PeerRecord:
    """What a peer announces about itself; TXT keys are the field names except host and port."""

    peer_id: str
    cluster: str
    protocol_version: int
    model_fingerprint: str
    mu: float
    host: str
    port: int
    depth: int | None = None  # blocks kept (models with early exits); None: all, no TXT key
    # Learned units per sliceable group (TXT "widths": comma list); empty: uniform, no TXT key.
    widths: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check_identifier("peer_id", self.peer_id)
        _check_identifier("cluster", self.cluster)
        _check_identifier("model_fingerprint", self.model_fingerprint)
        if type(self.protocol_version) is not int or self.protocol_version < 0:
            raise ValueError(
                f"protocol_version must be a non-negative integer, got {self.protocol_version!r}"
            )
        if type(self.mu) not in (int, float) or not math.isfinite(self.mu) or not 0 < self.mu <= 1:
            raise ValueError(f"mu must be a number in (0, 1], got {self.mu!r}")
        if self.depth is not None and (type(self.depth) is not int or self.depth < 1):
            raise ValueError(f"depth must be an integer >= 1, got {self.depth!r}")
        if any(type(w) is not int or w < 1 for w in self.widths):
            raise ValueError(f"widths must be integers >= 1, got {self.widths!r}")
        if len(",".join(map(str, self.widths))) > TXT_VALUE_LIMIT:
            raise ValueError(f"widths take more than the {TXT_VALUE_LIMIT} characters a TXT "
                             f"value holds: {self.widths!r}")
        _check_port(self.port)
        object.__setattr__(self, "mu", float(self.mu))
        object.__setattr__(self, "host", _normalize_host(self.host))

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    def to_txt(self) -> dict[str, str]:
        return {
            "peer_id": self.peer_id,
            "cluster": self.cluster,
            "protocol_version": str(self.protocol_version),
            "model_fingerprint": self.model_fingerprint,
            "mu": repr(self.mu),
            **({} if self.depth is None else {"depth": str(self.depth)}),
            **({"widths": ",".join(map(str, self.widths))} if self.widths else {}),
        }

    @classmethod
    def from_txt(cls, properties: Mapping[str, str | None], host: str, port: int) -> PeerRecord:
        """Validate a peer's TXT properties; ValueError names the bad or missing key."""

        def value(key: str) -> str:
            text = properties.get(key)
            if text is None:
                raise ValueError(f"TXT key {key!r} is missing or has no value")
            return text

        protocol_text = value("protocol_version")
        if not _PROTOCOL.fullmatch(protocol_text):
            raise ValueError(f"TXT key 'protocol_version' is not an integer: {protocol_text!r}")
        mu_text = value("mu")
        try:
            mu = float(mu_text)
        except ValueError:
            raise ValueError(f"TXT key 'mu' is not a number: {mu_text!r}") from None
        depth_text = properties.get("depth")
        if depth_text is not None and not _PROTOCOL.fullmatch(depth_text):
            raise ValueError(f"TXT key 'depth' is not an integer: {depth_text!r}")
        widths_text = properties.get("widths")
        widths_parts = [] if widths_text is None else widths_text.split(",")
        if not all(_PROTOCOL.fullmatch(part) for part in widths_parts):
            raise ValueError(f"TXT key 'widths' is not a comma list of integers: {widths_text!r}")
        try:
            return cls(
                peer_id=value("peer_id"),
                cluster=value("cluster"),
                protocol_version=int(protocol_text),
                model_fingerprint=value("model_fingerprint"),
                mu=mu,
                host=host,
                port=port,
                depth=None if depth_text is None else int(depth_text),
                widths=tuple(int(part) for part in widths_parts),
            )
        except ValueError as error:
            raise ValueError(f"bad TXT record: {error}") from None


@dataclass(frozen=True)
class Candidate:
    """An address worth trying; `record` is None where only a handshake will tell who is there."""

    address: str
    record: PeerRecord | None


class Discovery(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def candidates(self) -> list[Candidate]: ...


class StaticDiscovery:
    """Addresses given by the operator (`--peer HOST:PORT`); all are checked up front."""

    def __init__(self, addresses: Iterable[str]) -> None:
        normalized = (format_address(*parse_address(text)) for text in addresses)
        self._candidates = [Candidate(address, None) for address in dict.fromkeys(normalized)]

    async def start(self) -> None:
        """Nothing to start: the addresses are fixed."""

    async def stop(self) -> None:
        """Nothing to stop."""

    def candidates(self) -> list[Candidate]:
        return list(self._candidates)


class MdnsDiscovery:
    """Announces this peer as `_peerd._tcp.local.` and keeps the compatible peers it hears.

    A compatible peer shares cluster, protocol version and model fingerprint; the others are
    counted in `ignored` by reason ("cluster", "protocol", "fingerprint", "malformed",
    "unresolved"), once per announcement heard, so an operator can see why a machine on the
    LAN is not joining. The service is multicast on `interface` only (an IPv4 address), or on
    every IPv4 interface when it is None.
    """

    def __init__(self, own: PeerRecord, interface: str | None = None) -> None:
        if interface is not None:
            try:
                ipaddress.IPv4Address(interface)
            except ValueError:
                raise ValueError(f"interface must be an IPv4 address, got {interface!r}") from None
        # The id names the service instance and the host.
        if len(own.peer_id) > MAX_MDNS_PEER_ID or not all(own.peer_id.split(".")):
            raise ValueError(
                f"peer_id must be at most {MAX_MDNS_PEER_ID} characters without empty "
                f"dot-separated parts to serve as an mDNS name, got {own.peer_id!r}"
            )
        advertised = interface if interface is not None else own.host
        try:
            unspecified = ipaddress.ip_address(advertised).is_unspecified
        except ValueError:
            unspecified = True
        if unspecified:
            raise ValueError(f"mDNS needs a concrete IP address to announce, got {advertised!r}")
        self.own = own
        self.interface = interface
        self.ignored: Counter[str] = Counter()
        label = instance_label(own.peer_id, own.cluster)
        self._service_name = f"{label}.{SERVICE_TYPE}"
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            self._service_name,
            port=own.port,
            properties=own.to_txt(),
            server=f"{label}.local.",
            parsed_addresses=[advertised],
        )
        self._peers: dict[str, PeerRecord] = {}
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._zeroconf: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._registered = False

    async def start(self) -> None:
        if self._zeroconf is not None:
            raise RuntimeError("MdnsDiscovery is already started")
        zeroconf = AsyncZeroconf(
            interfaces=InterfaceChoice.All if self.interface is None else [self.interface],
            ip_version=IPVersion.V4Only,
        )
        self._zeroconf = zeroconf
        try:
            async with asyncio.timeout(STEP_TIMEOUT_S):
                # Registering probes the name first: a second peer with our id fails here.
                try:
                    announced = await zeroconf.async_register_service(self._info)
                except NonUniqueNameException:
                    raise DuplicatePeerId(
                        f"peer id {self.own.peer_id!r} is already announced by another daemon "
                        f"of cluster {self.own.cluster!r} on this network: give this one "
                        f"another --peer-id") from None
                self._registered = True
                self._browser = AsyncServiceBrowser(
                    zeroconf.zeroconf, SERVICE_TYPE, handlers=[self._on_service_state_change]
                )
                await announced
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        zeroconf, browser = self._zeroconf, self._browser
        self._zeroconf, self._browser = None, None
        if browser is not None:
            await browser.async_cancel()
        tasks = list(self._resolving.values())
        self._resolving.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._peers.clear()
        if zeroconf is None:
            return
        try:
            # Goodbye packets let the others drop us now rather than when our TTL runs out.
            if self._registered:
                self._registered = False
                async with asyncio.timeout(STEP_TIMEOUT_S):
                    await (await zeroconf.async_unregister_service(self._info))
        finally:
            await zeroconf.async_close()

    def candidates(self) -> list[Candidate]:
        records = sorted(self._peers.values(), key=lambda record: record.peer_id)
        return [Candidate(record.address, record) for record in records]

    def _on_service_state_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        # Called on the event loop by the browser; resolving is left to a task.
        if name.lower() == self._service_name.lower():
            return
        pending = self._resolving.pop(name, None)
        if pending is not None:
            pending.cancel()
        if state_change is ServiceStateChange.Removed:
            self._peers.pop(name, None)
            return
        task = asyncio.get_running_loop().create_task(self._resolve(zeroconf, name))
        self._resolving[name] = task
        task.add_done_callback(lambda done: self._forget_task(name, done))

    def _forget_task(self, name: str, task: asyncio.Task[None]) -> None:
        if self._resolving.get(name) is task:
            del self._resolving[name]

    async def _resolve(self, zeroconf: Zeroconf, name: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(zeroconf, RESOLVE_TIMEOUT_S * 1000):
            self._reject(name, "unresolved")
            return
        addresses = info.parsed_addresses(IPVersion.V4Only) or info.parsed_addresses()
        if not addresses or info.port is None:
            self._reject(name, "malformed")
            return
        try:
            record = PeerRecord.from_txt(info.decoded_properties, addresses[0], info.port)
        except ValueError:
            self._reject(name, "malformed")
            return
        # The instance name derives from the peer id: a record claiming another id is not to
        # be trusted.
        claimed = f"{instance_label(record.peer_id, record.cluster)}.{SERVICE_TYPE}"
        if name.lower() != claimed.lower():
            self._reject(name, "malformed")
        elif record.cluster != self.own.cluster:
            self._reject(name, "cluster")
        elif record.protocol_version != self.own.protocol_version:
            self._reject(name, "protocol")
        elif record.model_fingerprint != self.own.model_fingerprint:
            self._reject(name, "fingerprint")
        else:
            self._peers[name] = record

    def _reject(self, name: str, reason: str) -> None:
        # A known peer that now announces something incompatible is no longer a candidate.
        self._peers.pop(name, None)
        self.ignored[reason] += 1


class DiscoveryManager:
    """One face over several sources: started and stopped together, candidates merged."""

    def __init__(self, sources: Sequence[Discovery]) -> None:
        self.sources = list(sources)

    async def start(self) -> None:
        started: list[Discovery] = []
        try:
            for source in self.sources:
                await source.start()
                started.append(source)
        except BaseException:
            for source in reversed(started):
                with contextlib.suppress(Exception):
                    await source.stop()
            raise

    async def stop(self) -> None:
        results = await asyncio.gather(
            *(source.stop() for source in self.sources), return_exceptions=True
        )
        errors = [result for result in results if isinstance(result, BaseException)]
        if errors:
            raise errors[0]

    def candidates(self) -> list[Candidate]:
        """Each address once, in source order; a candidate with a record wins over one without."""
        merged: dict[str, Candidate] = {}
        for source in self.sources:
            for candidate in source.candidates():
                known = merged.get(candidate.address)
                if known is None or (known.record is None and candidate.record is not None):
                    merged[candidate.address] = candidate
        return list(merged.values())
