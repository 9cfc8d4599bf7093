"""Constants of the QEMU migration stream, in one place, with their QEMU names.

Reference: QEMU 7.2 (migration/savevm.c, migration/ram.c, migration/migration.c).
Every integer on the wire is big-endian.
"""

# --- stream header (savevm.c) ---
QEMU_VM_FILE_MAGIC = 0x5145564D  # "QEVM"
QEMU_VM_FILE_VERSION = 0x00000003

# --- section types (savevm.c) ---
QEMU_VM_EOF = 0x00
QEMU_VM_SECTION_START = 0x01
QEMU_VM_SECTION_PART = 0x02
QEMU_VM_SECTION_END = 0x03
QEMU_VM_SECTION_FULL = 0x04
QEMU_VM_SUBSECTION = 0x05
QEMU_VM_VMDESCRIPTION = 0x06
QEMU_VM_CONFIGURATION = 0x07
QEMU_VM_COMMAND = 0x08
QEMU_VM_SECTION_FOOTER = 0x7E

SECTION_TYPE_NAMES = {
    QEMU_VM_EOF: "EOF",
    QEMU_VM_SECTION_START: "SECTION_START",
    QEMU_VM_SECTION_PART: "SECTION_PART",
    QEMU_VM_SECTION_END: "SECTION_END",
    QEMU_VM_SECTION_FULL: "SECTION_FULL",
    QEMU_VM_SUBSECTION: "SUBSECTION",
    QEMU_VM_VMDESCRIPTION: "VMDESCRIPTION",
    QEMU_VM_CONFIGURATION: "CONFIGURATION",
    QEMU_VM_COMMAND: "COMMAND",
    QEMU_VM_SECTION_FOOTER: "SECTION_FOOTER",
}

# --- the RAM section (ram.c) ---
RAM_SECTION_IDSTR = "ram"
RAM_SECTION_INSTANCE = 0
RAM_SECTION_VERSION = 4

# Flags live in the low bits of the be64 whose high bits are the page offset.
RAM_SAVE_FLAG_FULL = 0x01  # obsolete, never sent
RAM_SAVE_FLAG_ZERO = 0x02
RAM_SAVE_FLAG_MEM_SIZE = 0x04
RAM_SAVE_FLAG_PAGE = 0x08
RAM_SAVE_FLAG_EOS = 0x10
RAM_SAVE_FLAG_CONTINUE = 0x20
RAM_SAVE_FLAG_XBZRLE = 0x40
RAM_SAVE_FLAG_HOOK = 0x80
RAM_SAVE_FLAG_COMPRESS_PAGE = 0x100
RAM_SAVE_FLAG_MULTIFD_FLUSH = 0x200
# Ferry's own RAM record, outside QEMU's range: QEMU keeps its flags at 0x200
# and below so that they fit under any target page of 1 KiB or more
# (migration/ram.c: "We can't use any flag that is bigger than 0x200"); with
# Ferry's 4 KiB target page, 0x400 is still a flag bit. Capability
# page-checksums: be64 0x400, be32 count, then count be64 check values, one per
# target page record that follows on that channel (docs/protocol.md). A QEMU
# destination refuses it (unknown flag): turn page-checksums off for QEMU.
RAM_SAVE_FLAG_FERRY_PAGE_CHECKS = 0x400
FERRY_PAGE_CHECKS_MAX = 4096  # most check values in one record (16 MiB of pages)
# The flags occupy the bits below the target page size; the rest is the offset.
RAM_SAVE_FLAG_MASK = 0xFFF

RAM_FLAG_NAMES = {
    RAM_SAVE_FLAG_ZERO: "ZERO",
    RAM_SAVE_FLAG_MEM_SIZE: "MEM_SIZE",
    RAM_SAVE_FLAG_PAGE: "PAGE",
    RAM_SAVE_FLAG_EOS: "EOS",
    RAM_SAVE_FLAG_CONTINUE: "CONTINUE",
    RAM_SAVE_FLAG_XBZRLE: "XBZRLE",
    RAM_SAVE_FLAG_HOOK: "HOOK",
    RAM_SAVE_FLAG_COMPRESS_PAGE: "COMPRESS_PAGE",
    RAM_SAVE_FLAG_MULTIFD_FLUSH: "MULTIFD_FLUSH",
    RAM_SAVE_FLAG_FERRY_PAGE_CHECKS: "FERRY_PAGE_CHECKS",
}

TARGET_PAGE_BITS = 12
TARGET_PAGE_SIZE = 1 << TARGET_PAGE_BITS  # 4 KiB, x86 target page
IDSTR_MAX = 255  # idstr length is a u8 on the wire

# Host page sizes a RAM block may have (its migration granularity).
PAGE_SIZE_4K = 4 << 10
PAGE_SIZE_2M = 2 << 20
PAGE_SIZE_1G = 1 << 30
HOST_PAGE_SIZES = (PAGE_SIZE_4K, PAGE_SIZE_2M, PAGE_SIZE_1G)

# --- commands (savevm.c, enum qemu_vm_cmd) ---
MIG_CMD_INVALID = 0
MIG_CMD_OPEN_RETURN_PATH = 1
MIG_CMD_PING = 2
MIG_CMD_POSTCOPY_ADVISE = 3
MIG_CMD_POSTCOPY_LISTEN = 4
MIG_CMD_POSTCOPY_RUN = 5
MIG_CMD_POSTCOPY_RAM_DISCARD = 6
MIG_CMD_PACKAGED = 7
MIG_CMD_ENABLE_COLO = 8
MIG_CMD_POSTCOPY_RESUME = 9
MIG_CMD_RECV_BITMAP = 10
MIG_CMD_MAX = 11

MIG_CMD_NAMES = {
    MIG_CMD_OPEN_RETURN_PATH: "OPEN_RETURN_PATH",
    MIG_CMD_PING: "PING",
    MIG_CMD_POSTCOPY_ADVISE: "POSTCOPY_ADVISE",
    MIG_CMD_POSTCOPY_LISTEN: "POSTCOPY_LISTEN",
    MIG_CMD_POSTCOPY_RUN: "POSTCOPY_RUN",
    MIG_CMD_POSTCOPY_RAM_DISCARD: "POSTCOPY_RAM_DISCARD",
    MIG_CMD_PACKAGED: "PACKAGED",
    MIG_CMD_ENABLE_COLO: "ENABLE_COLO",
    MIG_CMD_POSTCOPY_RESUME: "POSTCOPY_RESUME",
    MIG_CMD_RECV_BITMAP: "RECV_BITMAP",
}

# Fixed payload lengths (savevm.c mig_cmd_args; -1 = variable).
MIG_CMD_ARGS_LEN = {
    MIG_CMD_OPEN_RETURN_PATH: 0,
    MIG_CMD_PING: 4,
    MIG_CMD_POSTCOPY_ADVISE: -1,  # 0 or 16
    MIG_CMD_POSTCOPY_LISTEN: 0,
    MIG_CMD_POSTCOPY_RUN: 0,
    MIG_CMD_POSTCOPY_RAM_DISCARD: -1,
    MIG_CMD_PACKAGED: 4,
    MIG_CMD_ENABLE_COLO: 0,
    MIG_CMD_POSTCOPY_RESUME: 0,
    MIG_CMD_RECV_BITMAP: -1,
}

# POSTCOPY_RAM_DISCARD: version byte and the most (start, length) pairs per command.
POSTCOPY_RAM_DISCARD_VERSION = 0
MAX_DISCARDS_PER_COMMAND = 12
# MAX_VM_CMD_PACKAGED_SIZE in savevm.c
MAX_VM_CMD_PACKAGED_SIZE = 1 << 24

# --- return path messages (migration.c, enum mig_rp_message_type) ---
MIG_RP_MSG_INVALID = 0
MIG_RP_MSG_SHUT = 1
MIG_RP_MSG_PONG = 2
MIG_RP_MSG_REQ_PAGES_ID = 3
MIG_RP_MSG_REQ_PAGES = 4
MIG_RP_MSG_RECV_BITMAP = 5
MIG_RP_MSG_RESUME_ACK = 6
MIG_RP_MSG_MAX = 7
# Ferry's own return-path message, outside QEMU's range: the destination's
# per-block digests after the load, so the source can verify before it
# releases the guest. Payload: u8 count, then per block u8 name length, name,
# 32-byte sha256.
MIG_RP_MSG_FERRY_DIGESTS = 0x4664  # "Fd"

MIG_RP_MSG_NAMES = {
    MIG_RP_MSG_SHUT: "SHUT",
    MIG_RP_MSG_PONG: "PONG",
    MIG_RP_MSG_REQ_PAGES_ID: "REQ_PAGES_ID",
    MIG_RP_MSG_REQ_PAGES: "REQ_PAGES",
    MIG_RP_MSG_RECV_BITMAP: "RECV_BITMAP",
    MIG_RP_MSG_RESUME_ACK: "RESUME_ACK",
    MIG_RP_MSG_FERRY_DIGESTS: "FERRY_DIGESTS",
}
# Fixed lengths (migration.c rp_cmd_args; -1 = variable).
MIG_RP_MSG_ARGS_LEN = {
    MIG_RP_MSG_SHUT: 4,
    MIG_RP_MSG_PONG: 4,
    MIG_RP_MSG_REQ_PAGES_ID: -1,
    MIG_RP_MSG_REQ_PAGES: 12,
    MIG_RP_MSG_RECV_BITMAP: -1,
    MIG_RP_MSG_RESUME_ACK: 4,
    MIG_RP_MSG_FERRY_DIGESTS: -1,
}
RAMBLOCK_RECV_BITMAP_ENDING = 0x0123456789ABCDEF
# A PONG value of Ferry's own, only between Ferry workers: the destination's
# keepalive on the return path, every liveness-timeout/3 s, so the source's
# return-path reader can bound its silence (docs/reliability.md, "Liveness").
FERRY_PONG_KEEPALIVE = 0x464B414C  # "FKAL"
# A SHUT value of Ferry's own, only between Ferry workers: a destination that
# failed before it processed POSTCOPY_RUN says so on a recovery connection (its
# guest never ran, so the source's copy is the only one; docs/reliability.md).
# QEMU sends SHUT 0 (done) or 1 (failed) only.
FERRY_SHUT_NEVER_RAN = 0x464E5652  # "FNVR"
MIGRATION_RESUME_ACK_VALUE = 1

# Ferry's own verdict, source -> destination on the main channel after the end
# of the stream (after EOF, and the VM description if any), only between
# Ferry workers: be32 magic, be32 outcome. The destination's guest may run
# only once it read FERRY_VERDICT_COMPLETED (docs/reliability.md).
FERRY_VERDICT_MAGIC = 0x46565244  # "FVRD"
FERRY_VERDICT_COMPLETED = 0
FERRY_VERDICT_FAILED = 1
FERRY_VERDICT_SIZE = 8

# Digest carried in MIG_RP_MSG_FERRY_DIGESTS.
DIGEST_SIZE = 32  # sha256

# Ferry's channel hello, only between Ferry workers (docs/protocol.md, "Channel
# hello"): the first bytes of every migration connection, inside TLS when TLS
# is on, before QEMU's stream header on the main channel and before any page
# on a POSTCOPY channel. Client -> server:
#   FERRY_HELLO_MAGIC, be16 wire version, u8 role, u8 index, 16-byte migration
#   id, 16-byte nonce, be16 length + features (UTF-8 "name=value" lines),
#   32-byte HMAC-SHA256 over everything before it, keyed by the migration
#   secret.
# Server -> client: FERRY_HELLO_REPLY_MAGIC, u8 status, be16 length + UTF-8
# message, 32-byte HMAC-SHA256 (same key) over the hello's HMAC and the reply
# before it. A hello that cannot prove itself gets no reply: it is closed.
FERRY_HELLO_MAGIC = b"FERRY\x00HI"
FERRY_HELLO_REPLY_MAGIC = b"FERRY\x00OK"
FERRY_WIRE_VERSION = 1
FERRY_HELLO_ROLE_MAIN = 0  # the main channel (PRECOPY channel and return path)
FERRY_HELLO_ROLE_POSTCOPY = 1  # a POSTCOPY channel, index 1..postcopy-channels
FERRY_HELLO_ROLE_MULTIFD = 2  # a multifd channel, index 1..multifd-channels
FERRY_HELLO_ROLE_NAMES = {FERRY_HELLO_ROLE_MAIN: "main", FERRY_HELLO_ROLE_POSTCOPY: "postcopy",
                          FERRY_HELLO_ROLE_MULTIFD: "multifd"}
FERRY_HELLO_ID_SIZE = 16
FERRY_HELLO_NONCE_SIZE = 16
FERRY_HELLO_MAC_SIZE = 32  # HMAC-SHA256
FERRY_HELLO_FIXED_SIZE = 8 + 2 + 1 + 1 + FERRY_HELLO_ID_SIZE + FERRY_HELLO_NONCE_SIZE + 2  # up to the features
FERRY_HELLO_MAX_FEATURES = 4096  # bytes of the features text
FERRY_HELLO_OK = 0
FERRY_HELLO_MISMATCH = 1  # wire version or format-changing features differ: the message says which
FERRY_HELLO_MAX_MESSAGE = 4096

# --- multifd (capability multifd, parameter multifd-channels) ---
# Ferry's own packet format on the multifd channels (docs/protocol.md,
# "Multifd channels"); QEMU's MultiFDPacket_t (migration/multifd.h) is the
# model but not the format: a QEMU peer never gets multifd channels from Ferry.
# Every integer big-endian. A channel opens with the init record, then carries
# packets until one with FERRY_MULTIFD_FLAG_FIN. The destination answers the
# init record (the only bytes it sends on a multifd channel), so a channel count
# that differs is named on both sides even without the channel hello.
#   init:   be32 magic, be32 version, u8 channel id (1..N), u8 channels (N), be16 0, be32 0
#   reply:  be32 magic, be32 version, u8 status, u8 the destination's channels, be16 0, be32 0
#   packet: be32 magic, be16 flags, be16 idstr length, be32 normal pages,
#           be32 zero pages, be64 packet number, be32 pass, be32 0,
#           idstr, (normal + zero) x be64 offset (normal pages first),
#           [(normal + zero) x be64 check value, with FLAG_CHECKS],
#           normal x 4096 bytes of page data
FERRY_MULTIFD_MAGIC = 0x464D4644  # "FMFD" (QEMU's MULTIFD_MAGIC is 0x11223344)
FERRY_MULTIFD_VERSION = 2  # 2: the destination answers the init record
FERRY_MULTIFD_INIT_SIZE = 16
FERRY_MULTIFD_REPLY_SIZE = 16
FERRY_MULTIFD_REPLY_OK = 0
FERRY_MULTIFD_REPLY_CHANNELS = 1  # multifd-channels differ: the reply carries the destination's
FERRY_MULTIFD_HEADER_SIZE = 32
# The channel finished every page of pass ``pass`` it was given; its next
# packet belongs to pass + 1 and is read only once every channel reached this
# point (QEMU: MULTIFD_FLAG_SYNC, answered by RAM_SAVE_FLAG_MULTIFD_FLUSH on
# the main channel).
FERRY_MULTIFD_FLAG_SYNC = 0x1  # QEMU's MULTIFD_FLAG_SYNC
FERRY_MULTIFD_FLAG_FIN = 0x2  # Ferry: the channel's last packet; the connection ends after it
FERRY_MULTIFD_FLAG_CHECKS = 0x4  # Ferry: check values (page-checksums) follow the offsets
FERRY_MULTIFD_FLAGS = FERRY_MULTIFD_FLAG_SYNC | FERRY_MULTIFD_FLAG_FIN | FERRY_MULTIFD_FLAG_CHECKS
# Most pages in one packet: 2 MiB, one 2 MiB host page (QEMU: MULTIFD_PACKET_SIZE, 512 KiB).
FERRY_MULTIFD_PACKET_PAGES = 512
