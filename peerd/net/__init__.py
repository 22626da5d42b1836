"""Networking: the wire codec, gRPC service and client, discovery and membership."""

# 2: Hello carries the view's first round and leave tickets (daemons of version 1 cannot take
# part in the leave agreement), and a slice for a round ahead of the receiver is retried.
PROTOCOL_VERSION = 2

# Explicit limits: frames are chunks of a few hundred KiB, so 8 MiB leaves room for headers
# that list unit indices without letting a peer make us buffer arbitrarily large messages.
MAX_MESSAGE_BYTES = 8 << 20
# Slices from this many payload bytes go over the bulk path (peerd/net/bulk.py,
# `--bulk-threshold`): below it, gRPC's copy costs less than a connection of their own.
DEFAULT_BULK_THRESHOLD = 1 << 20
GRPC_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Keepalive pings notice a dead peer on an idle connection within ~15 s.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
]
