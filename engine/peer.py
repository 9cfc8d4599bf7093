"""What kind of peer a worker talks to, and which Ferry-only features that allows.

Every feature that only a Ferry peer understands is switched here, in one
place, from the ``peer`` parameter: ``ferry`` (the default) or ``qemu`` (a
real QEMU on the other end). Code asks :func:`peer_features` instead of
testing the peer kind itself, so a new Ferry-only feature (a return-path
message, a RAM flag, a device section) is one more field below.

With a QEMU peer (QEMU 7.2 savevm.c / migration.c):
- the stream starts with CONFIGURATION (machine type), as QEMU sends and a
  QEMU destination requires ("Configuration section missing");
- Ferry's own ``ferry-guest`` device section is not sent (QEMU does not know
  it); device state carried from a QEMU stream is sent verbatim instead;
- completion is SHUT(0) on the return path followed by the return path
  closing; the digest exchange (FERRY_DIGESTS) is Ferry-to-Ferry only;
- Ferry-only capabilities (e.g. per-page checksum records) are off;
- no channel hello (engine/channel_auth.py): QEMU tells channels apart by
  arrival order (under TLS when tls-creds is set).
"""
from __future__ import annotations

from dataclasses import dataclass

PEER_FERRY = "ferry"
PEER_QEMU = "qemu"
PEER_KINDS = (PEER_FERRY, PEER_QEMU)

# How the source learns the destination loaded everything.
COMPLETION_DIGESTS = "digests"  # SHUT(0), then FERRY_DIGESTS compared with ours
COMPLETION_SHUT = "shut"  # SHUT(0), then the return path closes (QEMU)

# Capabilities only Ferry workers understand: forced off with a QEMU peer.
FERRY_ONLY_CAPABILITIES = ("page-checksums",)


@dataclass(frozen=True)
class PeerFeatures:
    """Ferry-only features allowed with a peer kind (see the module docstring)."""

    kind: str
    digests: bool  # FERRY_DIGESTS after SHUT(0); the guest-state digests in a file stream
    guest_device: bool  # Ferry's own 'ferry-guest' device section
    configuration: bool  # CONFIGURATION record after the header
    completion: str  # COMPLETION_DIGESTS or COMPLETION_SHUT
    ferry_only_capabilities: bool  # capabilities in FERRY_ONLY_CAPABILITIES may be on
    channel_hello: bool = False  # each connection opens with the channel hello (channels/hello.py)
    rp_keepalive: bool = False  # the destination sends FERRY_PONG_KEEPALIVE on the return path


_FEATURES = {
    PEER_FERRY: PeerFeatures(PEER_FERRY, digests=True, guest_device=True, configuration=False,
                             completion=COMPLETION_DIGESTS, ferry_only_capabilities=True, channel_hello=True,
                             rp_keepalive=True),
    PEER_QEMU: PeerFeatures(PEER_QEMU, digests=False, guest_device=False, configuration=True,
                            completion=COMPLETION_SHUT, ferry_only_capabilities=False),
}


def peer_features(kind: str) -> PeerFeatures:
    """The features for a peer kind; ValueError names an unknown kind."""
    try:
        return _FEATURES[kind]
    except KeyError:
        raise ValueError(f"peer {kind!r}: expected one of {', '.join(PEER_KINDS)}") from None


def effective_capability(features: PeerFeatures, name: str, value: bool) -> bool:
    """A capability's value as used with this peer: Ferry-only ones are off with QEMU."""
    if name in FERRY_ONLY_CAPABILITIES and not features.ferry_only_capabilities:
        return False
    return value
