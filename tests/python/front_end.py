#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# A small front-end for tce-sidecar, playing QEMU on the model kernel.
#
# Written from protocol/PROTOCOL.md (the sidecar protocol) and protocol/MODEL.md (the model
# kernel's socket protocol) alone, without reading the daemon's source: it is a test of the
# specification. Python 3 standard library only.
#
#   python3 tests/python/front_end.py --socket SIDECAR_SOCKET --model MODEL_SOCKET \
#       --mode accelerated|isolated
#
# It makes a VM on the model kernel (MODEL.md §6.3), guest RAM in a sealed memfd declared with
# MM_MAP (§4.3), opens a VFIO group, then drives one session (PROTOCOL.md §4-§7): negotiate,
# MEM_ADD, GROUP_ADD, TABLE_ADD, WINDOW_CREATE, one TCE_UPDATE mapping a page, then WINDOW_REMOVE,
# TABLE_REMOVE, GROUP_REMOVE, MEM_REMOVE, and CLOSEs its model files (MODEL.md §5). In accelerated
# mode it executes the owner operations the sidecar returns (PROTOCOL.md §6, MODEL.md §7) after
# checking them against what the request allows (§6.3). It reads the IOMMU entry the update maps
# with IOMMU_ENTRY (MODEL.md §6.6) after the update and after WINDOW_REMOVE.

import argparse
import array
import ctypes
import errno
import fcntl
import json
import mmap
import os
import socket
import struct
import sys

TIMEOUT = 10.0
HDR = struct.Struct("<III")             # request, flags, size (PROTOCOL.md §2)
VERSION, F_REPLY = 1, 1 << 2
MAX_PAYLOAD, MAX_FDS = 65536, 8

# ---- PROTOCOL.md constants ----
GET_FEATURES, SET_FEATURES, GET_STATUS, MEM_ADD, MEM_REMOVE, GROUP_ADD, GROUP_REMOVE = 1, 2, 3, 4, 5, 6, 7
TABLE_ADD, TABLE_REMOVE, WINDOW_CREATE, WINDOW_REMOVE = 8, 9, 11, 12
TCE_UPDATE, OPS_RESULT = 14, 16
MODE_ACCELERATED, MODE_ISOLATED, FDS_BY_MODE = 1 << 0, 1 << 1, 1 << 4
REPLY_FIXED = struct.Struct("<iIIHHII")  # status, flags, transaction, op_count, text_len, body_len, rsvd
R_OPS, R_ROLLBACK = 1 << 0, 1 << 1
OP = struct.Struct("<HHIIIQQQ")          # kind, flags, container, object, aux, arg0, arg1, arg2
RESULT = struct.Struct("<HHi4Q")         # kind, reserved, status, out[4]
SRC_SHARED, SRC_INLINE = 0, 1

(CONTAINER_OPEN, CONTAINER_CLOSE, CHECK_EXTENSION, SET_IOMMU, GROUP_SET_CONTAINER,
 GROUP_UNSET_CONTAINER, TCE_GET_INFO, REGISTER_MEMORY, UNREGISTER_MEMORY, TCE_CREATE, TCE_REMOVE,
 MAP_DMA, UNMAP_DMA, EEH_PE_OP, KVM_FILE_ADD, KVM_FILE_DEL, KVM_SET_SPAPR_TCE,
 KVM_HAS_DEVICE_ATTR) = range(1, 19)

# PROTOCOL.md §6.3: (forward kinds, rollback kinds) per request.
ALLOWED = {
    MEM_ADD: ({REGISTER_MEMORY}, {UNREGISTER_MEMORY}),
    MEM_REMOVE: ({UNREGISTER_MEMORY}, {REGISTER_MEMORY}),
    GROUP_ADD: ({CONTAINER_OPEN, GROUP_SET_CONTAINER, SET_IOMMU, TCE_GET_INFO, REGISTER_MEMORY,
                 TCE_REMOVE, KVM_FILE_ADD, KVM_SET_SPAPR_TCE},
                {CONTAINER_CLOSE, GROUP_UNSET_CONTAINER, UNREGISTER_MEMORY, KVM_FILE_DEL,
                 KVM_FILE_ADD, KVM_SET_SPAPR_TCE}),
    GROUP_REMOVE: ({KVM_FILE_DEL, UNMAP_DMA, TCE_REMOVE, UNREGISTER_MEMORY, GROUP_UNSET_CONTAINER,
                    CONTAINER_CLOSE}, {REGISTER_MEMORY}),
    WINDOW_CREATE: ({TCE_CREATE, KVM_FILE_ADD, KVM_SET_SPAPR_TCE},
                    {TCE_REMOVE, KVM_FILE_DEL, KVM_FILE_ADD, KVM_SET_SPAPR_TCE}),
    WINDOW_REMOVE: ({KVM_FILE_DEL, KVM_FILE_ADD, KVM_SET_SPAPR_TCE, UNMAP_DMA, TCE_REMOVE},
                    {KVM_FILE_DEL, KVM_FILE_ADD, KVM_SET_SPAPR_TCE}),
    TCE_UPDATE: ({MAP_DMA, UNMAP_DMA}, {UNMAP_DMA}),
}
MAX_OPS_PER_TXN, MAX_OPS_REPLIES = 256, 16   # our bound on one transaction (§1.2)

# ---- MODEL.md constants (§6.1) ----
M_OPEN_KVM, M_OPEN_VFIO_CONTAINER, M_OPEN_VFIO_GROUP, M_CLOSE, M_KVM_CREATE_VM = 1, 2, 3, 4, 5
M_KVM_CREATE_VCPU, M_KVM_SET_USER_MEMORY_REGION, M_KVM_CREATE_SPAPR_TCE_64 = 7, 9, 10
M_KVM_CREATE_DEVICE, M_KVM_SET_DEVICE_ATTR = 11, 12
M_GROUP_SET_CONTAINER, M_GROUP_UNSET_CONTAINER, M_GET_API_VERSION = 17, 18, 19
M_CHECK_EXTENSION, M_SET_IOMMU, M_TCE_GET_INFO, M_REGISTER_MEMORY = 20, 21, 24, 25
M_UNREGISTER_MEMORY, M_TCE_CREATE, M_TCE_REMOVE, M_MAP_DMA, M_UNMAP_DMA, M_EEH_PE_OP = 26, 27, 28, 29, 30, 31
M_MM_MAP, M_MM_UNMAP, M_IOMMU_ENTRY, M_FILE_KIND = 32, 33, 36, 37
NO_FD = (1 << 64) - 1
MODEL_RESULT_WORDS = {M_GET_API_VERSION: 1, M_CHECK_EXTENSION: 1, M_TCE_GET_INFO: 6,
                      M_TCE_CREATE: 1, M_MAP_DMA: 1, M_UNMAP_DMA: 1, M_EEH_PE_OP: 1,
                      M_IOMMU_ENTRY: 4, M_FILE_KIND: 1}
MODEL_FILE_OPS = {M_OPEN_KVM, M_OPEN_VFIO_CONTAINER, M_OPEN_VFIO_GROUP, M_KVM_CREATE_VM,
                  M_KVM_CREATE_VCPU, M_KVM_CREATE_SPAPR_TCE_64, M_KVM_CREATE_DEVICE}

F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_FUTURE_WRITE = 0x1, 0x2, 0x4, 0x10
F_ADD_SEALS = 1033

# ---- the guest ----
RAM_SIZE = 4 << 20
PAGE_SHIFT = 12                          # IOMMU page of the guest window
ENTRIES = 4096                           # 16 MiB window at bus address 0
LIOBN = 0x80000000
ENTRY_INDEX, ENTRY_GPA = 3, 0x5000        # the page the TCE_UPDATE maps
REGION, CONTAINER, GROUP, TABLE = 1, 1, 1, 1


VERBOSE = [False]


def trace(msg):
    if VERBOSE[0]:
        print("front_end: " + msg, file=sys.stderr)


class Fail(Exception):
    pass


STEP = ["start"]


def check(cond, why):
    if not cond:
        raise Fail(why)


def recv_frame(sock, expect_code, who):
    """Read one reply frame exactly (header, then payload); return (payload, fds)."""
    buf, fds = b"", []
    want = HDR.size
    header = None
    while True:
        try:
            data, anc, msg_flags, _ = sock.recvmsg(want - len(buf),
                                                   socket.CMSG_SPACE(MAX_FDS * 4),
                                                   socket.MSG_CMSG_CLOEXEC)
        except socket.timeout:
            raise Fail("%s: no reply within %.0f s" % (who, TIMEOUT))
        for level, typ, cdata in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds += array.array("i", cdata[:len(cdata) - len(cdata) % 4]).tolist()
        check(not msg_flags & socket.MSG_CTRUNC, "%s: ancillary data truncated" % who)
        check(data, "%s: end of stream (connection closed) while waiting for a reply" % who)
        buf += data
        if header is None and len(buf) == HDR.size:
            code, flags, size = HDR.unpack(buf)
            check(flags & 3 == VERSION and flags & ~7 == 0 and flags & F_REPLY,
                  "%s: broken reply header flags 0x%x" % (who, flags))
            check(size <= MAX_PAYLOAD, "%s: reply size %d > 65536" % (who, size))
            check(code == expect_code, "%s: reply carries request code %d, expected %d"
                  % (who, code, expect_code))
            header, buf, want = (code, flags, size), b"", size
        if header is not None and len(buf) == want:
            return buf, fds


def send_frame(sock, code, payload, fds):
    check(len(payload) <= MAX_PAYLOAD and len(fds) <= MAX_FDS, "request too large")
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    msg = HDR.pack(code, VERSION, len(payload)) + payload
    sent = sock.sendmsg([msg], anc)
    if sent < len(msg):
        sock.sendall(msg[sent:])


class Model:
    """A connection to the model kernel (MODEL.md §2, §3)."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)

    def call(self, op, words, fds=(), allow_fail=False):
        """Return (status, result words, fd or None); raise Fail on failure unless allow_fail."""
        payload = struct.pack("<%dQ" % len(words), *words)
        send_frame(self.sock, op, payload, list(fds))
        body, rfds = recv_frame(self.sock, op, "model op %d" % op)
        check(len(body) >= 8, "model op %d: reply of %d bytes" % (op, len(body)))
        (status,) = struct.unpack_from("<q", body)
        nwords = 0 if op in MODEL_FILE_OPS else MODEL_RESULT_WORDS.get(op, 0)
        nfds = 1 if op in MODEL_FILE_OPS and status == 0 and not (
            op == M_KVM_CREATE_DEVICE and words[2] & 1) else 0
        if status != 0:
            nwords, nfds = 0, 0
        if len(body) != 8 + 8 * nwords or len(rfds) != nfds:
            for fd in rfds:
                os.close(fd)
            raise Fail("model op %d: reply of %d bytes and %d fds, expected %d and %d"
                       % (op, len(body), len(rfds), 8 + 8 * nwords, nfds))
        if status != 0 and not allow_fail:
            raise Fail("model op %d %s failed: %s" % (op, list(words), errno.errorcode.get(-status, status)))
        return status, list(struct.unpack_from("<%dQ" % nwords, body, 8)), (rfds[0] if rfds else None)

    def file(self, op, words, fds=()):
        return self.call(op, words, fds)[2]


class Sidecar:
    """A session with tce-sidecar (PROTOCOL.md)."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.requests = 0

    def request(self, code, payload=b"", fds=()):
        """Send one request, return the checked reply as a dict (§3)."""
        send_frame(self.sock, code, payload, list(fds))
        self.requests += 1
        trace("request %d (%d bytes, %d fds)" % (code, len(payload), len(fds)))
        body, rfds = recv_frame(self.sock, code, "sidecar request %d" % code)
        for fd in rfds:
            os.close(fd)
        check(not rfds, "the reply carries fds (replies carry none, §2.1)")
        check(len(body) >= REPLY_FIXED.size, "reply of %d bytes, below the fixed part" % len(body))
        status, flags, txn, nops, tlen, blen, rsvd = REPLY_FIXED.unpack_from(body)
        check(len(body) == REPLY_FIXED.size + OP.size * nops + blen + tlen,
              "reply size %d does not match its counts" % len(body))
        check(rsvd == 0 and flags & ~3 == 0, "reserved reply bits set")
        check(bool(flags & R_OPS) == (txn != 0) == (nops != 0), "OPS, transaction and op_count disagree")
        check(not flags & R_ROLLBACK or flags & R_OPS, "ROLLBACK without OPS")
        check(not flags & R_OPS or status == 0, "nonzero status with operations pending")
        check(not flags & R_OPS or blen == 0, "a body with operations (it comes with the final reply)")
        check(nops <= 512 and tlen <= 1024, "too many operations or too much text")
        off = REPLY_FIXED.size
        ops = [OP.unpack_from(body, off + OP.size * i) for i in range(nops)]
        off += OP.size * nops
        text = body[off + blen:].decode("utf-8", "replace")
        check(status >= 0 or text, "an error reply without text")
        return {"status": status, "ops": ops, "txn": txn, "rollback": bool(flags & R_ROLLBACK),
                "body": body[off:off + blen], "text": text}


class FrontEnd:
    def __init__(self, args):
        self.mode = args.mode
        self.acc = args.mode == "accelerated"
        self.iommu_group = args.group or (1 if self.acc else 2)
        self.model = Model(args.model)
        self.sc = Sidecar(args.socket)
        self.owner_ops = 0
        self.refuse_kind = args.refuse_kind
        self.containers = {}   # container id -> container stand-in fd (CONTAINER_OPEN)
        self.device = None     # kvm-vfio device stand-in, created on first use
        self.groups = {}       # group id -> (container id, stand-in fd)
        self.tables = {}       # table id -> (container id, fd, bus_offset, entries, page_shift)
        self.regions = {}      # region id -> (user_addr, size)
        self.dma32_start = {}  # container id -> bus address of its default window (TCE_GET_INFO)

    # ---- one request, with its transaction ----

    def transact(self, code, payload, fds=(), body_len=0, scope=None):
        """Send a request; execute the owner operations of its transaction; return the final reply."""
        reply = self.sc.request(code, payload, fds)
        txn, nreplies, nops = reply["txn"], 0, 0
        while reply["ops"]:
            nreplies += 1
            nops += len(reply["ops"])
            check(nreplies <= MAX_OPS_REPLIES and nops <= MAX_OPS_PER_TXN,
                  "the transaction exceeds our bound (%d replies, %d operations)" % (nreplies, nops))
            check(not reply["body"], "a reply with operations carries a body")
            check(reply["txn"] == txn, "the transaction id changed from %d to %d" % (txn, reply["txn"]))
            results = []
            for op in reply["ops"]:
                why = self.refusal(code, scope, op, reply["rollback"])
                if op[0] == self.refuse_kind and not reply["rollback"]:
                    why = "--refuse-kind %d (a test of the rollback)" % op[0]
                if why:
                    print("front_end: refusing owner operation %s: %s" % (op, why), file=sys.stderr)
                    status, outs = -errno.EPERM, [0, 0, 0, 0]
                else:
                    status, outs = self.execute(op)
                    self.owner_ops += 1
                trace("  op kind=%d flags=%d container=%d object=%d aux=%d args=0x%x,0x%x,0x%x%s -> %d %s"
                      % (op + (" rollback" if reply["rollback"] else "", status, outs)))
                results.append(RESULT.pack(op[0], 0, status, *outs))
                if status != 0:
                    break
            reply = self.sc.request(OPS_RESULT, struct.pack("<II", txn, len(results)) + b"".join(results))
        check(reply["status"] == 0, "status %d (%s): %s" % (
            reply["status"], errno.errorcode.get(-reply["status"], "?"), reply["text"]))
        check(len(reply["body"]) == body_len, "reply body of %d bytes, expected %d"
              % (len(reply["body"]), body_len))
        return reply["body"]

    def refusal(self, code, scope, op, rollback):
        """Why an owner operation is not allowed (PROTOCOL.md §6, §6.3), or None."""
        kind, flags, cont, obj, aux, arg0, arg1, arg2 = op
        if not self.acc:
            return "isolated mode allows no operation"
        if code not in ALLOWED or kind not in ALLOWED[code][1 if rollback else 0]:
            return "kind %d is not allowed for request %d%s" % (kind, code, " (rollback)" if rollback else "")
        if kind in (KVM_FILE_ADD, KVM_FILE_DEL, KVM_SET_SPAPR_TCE):
            if cont != 0:
                return "container field set on a KVM operation"
            cont_of_op = self.groups.get(obj, (None,))[0]
        else:
            cont_of_op = cont
        # container: the request's own, or any of the session's for MEM_ADD/MEM_REMOVE
        if code in (MEM_ADD, MEM_REMOVE):
            if cont not in self.containers:
                return "container %d is not one of ours" % cont
        elif cont_of_op != scope["container"]:
            return "container %s is not the request's (%d)" % (cont_of_op, scope["container"])
        if kind == CONTAINER_OPEN and cont in self.containers:
            return "container %d is already open" % cont
        if kind not in (CONTAINER_OPEN,) and kind not in (KVM_FILE_ADD, KVM_FILE_DEL, KVM_SET_SPAPR_TCE) \
                and cont not in self.containers:
            return "no fd for container %d" % cont
        if kind in (GROUP_SET_CONTAINER, GROUP_UNSET_CONTAINER, KVM_FILE_ADD, KVM_FILE_DEL, KVM_SET_SPAPR_TCE):
            if obj not in self.groups:
                return "group %d is not ours" % obj
            if code in (GROUP_ADD, GROUP_REMOVE) and obj != scope["group"] and not rollback:
                return "group %d is not the request's" % obj
        if code == GROUP_ADD and kind == TCE_REMOVE and arg0 != self.dma32_start.get(cont):
            return "TCE_REMOVE of 0x%x is not the default window" % arg0
        if kind == KVM_SET_SPAPR_TCE and (aux not in self.tables or self.tables[aux][0] != scope["container"]):
            return "table %d is not one of the container's" % aux
        if kind in (REGISTER_MEMORY, UNREGISTER_MEMORY):
            if obj not in self.regions or arg0 != 0 or arg1 != self.regions[obj][1]:
                return "not a whole region of ours"
            if code in (MEM_ADD, MEM_REMOVE) and obj != scope["region"]:
                return "region %d is not the request's" % obj
        if code == TCE_UPDATE and kind in (MAP_DMA, UNMAP_DMA):
            lo, hi = scope["window"]
            iova, size = (arg1, arg2) if kind == MAP_DMA else (arg0, arg1)
            if size == 0 or iova < lo or iova + size > hi:
                return "iova range outside the table's window"
            if kind == MAP_DMA and (obj not in self.regions or arg0 + size > self.regions[obj][1]
                                    or flags & ~3 or not flags & 3):
                return "MAP_DMA outside a region of ours, or bad flags"
        return None

    def execute(self, op):
        """One owner operation as the model ops of MODEL.md §7; return (status, out[4])."""
        kind, flags, cont, obj, aux, arg0, arg1, arg2 = op
        C = self.containers.get(cont)
        G = self.groups.get(obj, (None, None))[1]
        m = self.model.call
        out = [0, 0, 0, 0]
        try:
            if kind == CONTAINER_OPEN:
                st, _, fd = m(M_OPEN_VFIO_CONTAINER, [], allow_fail=True)
                if st:
                    return st, out
                st, w, _ = m(M_GET_API_VERSION, [0], [fd], allow_fail=True)
                if st == 0 and w[0] != 0:
                    st = -errno.EINVAL
                if st:
                    m(M_CLOSE, [0], [fd], allow_fail=True)
                    os.close(fd)
                    return st, out
                self.containers[cont] = fd
                return 0, out
            if kind == CONTAINER_CLOSE:
                st, _, _ = m(M_CLOSE, [0], [C], allow_fail=True)
                if st == 0:
                    os.close(self.containers.pop(cont))
                return st, out
            if kind == CHECK_EXTENSION:
                st, w, _ = m(M_CHECK_EXTENSION, [0, aux], [C], allow_fail=True)
                return st, (w + [0, 0, 0]) if st == 0 else out
            if kind == SET_IOMMU:
                return m(M_SET_IOMMU, [0, aux], [C], allow_fail=True)[0], out
            if kind == GROUP_SET_CONTAINER:
                return m(M_GROUP_SET_CONTAINER, [0, 1], [G, C], allow_fail=True)[0], out
            if kind == GROUP_UNSET_CONTAINER:
                return m(M_GROUP_UNSET_CONTAINER, [0], [G], allow_fail=True)[0], out
            if kind == TCE_GET_INFO:
                st, w, _ = m(M_TCE_GET_INFO, [0, 32], [C], allow_fail=True)
                if st == 0:
                    f, s, z, p, wn, lv = w
                    self.dma32_start[cont] = s
                    out = [f, s | z << 32, p, wn | lv << 32]
                return st, out
            if kind in (REGISTER_MEMORY, UNREGISTER_MEMORY):
                mop = M_REGISTER_MEMORY if kind == REGISTER_MEMORY else M_UNREGISTER_MEMORY
                return m(mop, [0, 24, 0, self.regions[obj][0] + arg0, arg1], [C], allow_fail=True)[0], out
            if kind == TCE_CREATE:
                st, w, _ = m(M_TCE_CREATE, [0, 40, 0, aux, arg0, arg1], [C], allow_fail=True)
                return st, ([w[0], 0, 0, 0] if st == 0 else out)
            if kind == TCE_REMOVE:
                return m(M_TCE_REMOVE, [0, 16, 0, arg0], [C], allow_fail=True)[0], out
            if kind == MAP_DMA:
                st, w, _ = m(M_MAP_DMA, [0, 32, flags, self.regions[obj][0] + arg0, arg1, arg2], [C],
                             allow_fail=True)
                # value 1: a misaligned iova, nothing mapped (MODEL.md §6.5); §7 gives MAP_DMA
                # no output, so we report that nothing was mapped as EINVAL.
                return (-errno.EINVAL if st == 0 and w[0] else st), out
            if kind == UNMAP_DMA:
                st, _, _ = m(M_UNMAP_DMA, [0, 24, 0, arg0, arg1], [C], allow_fail=True)
                return st, ([arg1, 0, 0, 0] if st == 0 else out)
            if kind in (KVM_FILE_ADD, KVM_FILE_DEL, KVM_SET_SPAPR_TCE):
                if self.device is None:
                    st, _, fd = m(M_KVM_CREATE_DEVICE, [0, 4, 0], [self.vm], allow_fail=True)
                    if st:
                        return st, out
                    self.device = fd
                if kind == KVM_SET_SPAPR_TCE:
                    return m(M_KVM_SET_DEVICE_ATTR, [0, 1, 3, 1, 2],
                             [self.device, G, self.tables[aux][1]], allow_fail=True)[0], out
                attr = 1 if kind == KVM_FILE_ADD else 2
                return m(M_KVM_SET_DEVICE_ATTR, [0, 1, attr, 1, NO_FD], [self.device, G], allow_fail=True)[0], out
            return -errno.EPERM, out
        except (OSError, Fail) as e:   # the model connection failed (MODEL.md §7)
            print("front_end: model connection failed: %s" % e, file=sys.stderr)
            return -errno.EIO, out

    # ---- the run ----

    def step(self, name):
        STEP[0] = name

    def iommu_entry(self, bus_addr):
        return self.model.call(M_IOMMU_ENTRY, [self.iommu_group, bus_addr])[1]

    def run(self):
        m = self.model
        host_page = mmap.PAGESIZE

        self.step("model-vm")
        self.kvm = m.file(M_OPEN_KVM, [])
        self.vm = m.file(M_KVM_CREATE_VM, [0], [self.kvm])
        self.vcpu = m.file(M_KVM_CREATE_VCPU, [0, 0], [self.vm])

        self.step("model-ram")
        ram = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(ram, RAM_SIZE)
        fcntl.fcntl(ram, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)
        ram_map = mmap.mmap(ram, RAM_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        ua = ctypes.addressof(ctypes.c_char.from_buffer(ram_map))
        check(ua % host_page == 0, "guest RAM mapping not page aligned")
        m.call(M_MM_MAP, [0, ua, RAM_SIZE, 0, 12, 1], [ram])
        m.call(M_KVM_SET_USER_MEMORY_REGION, [0, 0, 0, 0, RAM_SIZE, ua], [self.vm])

        self.step("model-group")
        group_fd = m.file(M_OPEN_VFIO_GROUP, [self.iommu_group])

        self.step("GET_FEATURES")
        (offered,) = struct.unpack("<Q", self.transact(GET_FEATURES, b"", body_len=8))
        want = MODE_ACCELERATED | FDS_BY_MODE if self.acc else MODE_ISOLATED
        check(offered & want == want, "the sidecar offers 0x%x, we need 0x%x" % (offered, want))

        self.step("SET_FEATURES")
        (got,) = struct.unpack("<Q", self.transact(SET_FEATURES, struct.pack("<Q", want), body_len=8))
        check(got == want, "negotiated 0x%x, asked 0x%x" % (got, want))

        self.step("GET_STATUS")
        status = json.loads(self.status_body())
        check(status["daemon"]["kernel"] == "model", "the sidecar does not run on the model kernel")
        mine = [s for s in status["sessions"] if s["id"] == status["session"]]
        check(len(mine) == 1 and mine[0]["mode"] == self.mode, "our session is not listed as %s" % self.mode)
        worker_pid = mine[0]["worker_pid"]

        self.step("MEM_ADD")
        self.regions[REGION] = (ua, RAM_SIZE)
        mem = struct.pack("<IIQQQQ", REGION, PAGE_SHIFT if self.acc else 0, 0, RAM_SIZE, ua, 0)
        self.transact(MEM_ADD, mem, [] if self.acc else [ram], scope={"region": REGION})

        self.step("GROUP_ADD")
        self.groups[GROUP] = (CONTAINER, group_fd)
        self.transact(GROUP_ADD, struct.pack("<IIII", GROUP, CONTAINER, self.iommu_group, 0),
                      [] if self.acc else [group_fd], scope={"container": CONTAINER, "group": GROUP})
        check(not self.acc or CONTAINER in self.containers, "GROUP_ADD did not open our container")

        self.step("TABLE_ADD")
        tbytes = -(-ENTRIES * 8 // host_page) * host_page
        if self.acc:
            table_fd = m.file(M_KVM_CREATE_SPAPR_TCE_64, [0, LIOBN, PAGE_SHIFT, 0, 0, ENTRIES], [self.vm])
            table_map = mmap.mmap(table_fd, tbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            send_fd = table_fd
        else:
            table_fd = os.memfd_create("tce-table", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(table_fd, tbytes)
            table_map = mmap.mmap(table_fd, tbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            fcntl.fcntl(table_fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE)
            send_fd = os.open("/proc/self/fd/%d" % table_fd, os.O_RDONLY | os.O_CLOEXEC)
        self.tables[TABLE] = (CONTAINER, table_fd, 0, ENTRIES, PAGE_SHIFT)
        self.transact(TABLE_ADD, struct.pack("<IIIIQQ", TABLE, CONTAINER, LIOBN, PAGE_SHIFT, 0, ENTRIES),
                      [send_fd])
        if send_fd != table_fd:
            os.close(send_fd)

        self.step("WINDOW_CREATE")
        win = self.transact(WINDOW_CREATE, struct.pack("<II", TABLE, 0), body_len=16,
                            scope={"container": CONTAINER})
        start, hw_shift, levels = struct.unpack("<QII", win)
        check(start == 0 and hw_shift <= PAGE_SHIFT and levels >= 1,
              "window at 0x%x, page shift %d, %d levels" % (start, hw_shift, levels))

        self.step("TCE_UPDATE")
        tce = ENTRY_GPA | 3                 # READ | WRITE
        struct.pack_into("<Q", table_map, 8 * ENTRY_INDEX, tce)   # the guest-visible table first
        if self.acc:
            upd = struct.pack("<IIQIIQ", TABLE, SRC_INLINE, ENTRY_INDEX, 1, 0, tce)
        else:
            upd = struct.pack("<IIQII", TABLE, SRC_SHARED, ENTRY_INDEX, 1, 0)
        bus = ENTRY_INDEX << PAGE_SHIFT
        h_status, processed, _ = struct.unpack("<qII", self.transact(
            TCE_UPDATE, upd, body_len=16,
            scope={"container": CONTAINER, "window": (0, ENTRIES << PAGE_SHIFT)}))
        check(h_status == 0 and processed == 1, "h_status %d, processed %d" % (h_status, processed))

        self.step("IOMMU_ENTRY-mapped")
        present, pid, eua, bits = self.iommu_entry(bus)
        check(present == 1 and bits == 3, "entry at 0x%x: present %d bits %d" % (bus, present, bits))
        if self.acc:
            check(pid == os.getpid() and eua == ua + ENTRY_GPA,
                  "entry pinned by pid %d at 0x%x, expected %d at 0x%x" % (pid, eua, os.getpid(), ua + ENTRY_GPA))
        else:
            check(pid == worker_pid, "entry pinned by pid %d, not the worker %d" % (pid, worker_pid))

        self.step("WINDOW_REMOVE")
        self.transact(WINDOW_REMOVE, struct.pack("<II", TABLE, 0), scope={"container": CONTAINER})
        self.step("IOMMU_ENTRY-unmapped")
        check(self.iommu_entry(bus) == [0, 0, 0, 0], "the entry is still mapped after WINDOW_REMOVE")

        self.step("TABLE_REMOVE")
        self.transact(TABLE_REMOVE, struct.pack("<II", TABLE, 0))
        table_map.close()
        if self.acc:
            m.call(M_CLOSE, [0], [table_fd])
        os.close(table_fd)
        del self.tables[TABLE]

        self.step("GROUP_REMOVE")
        self.transact(GROUP_REMOVE, struct.pack("<II", GROUP, 0), scope={"container": CONTAINER, "group": GROUP})
        check(CONTAINER not in self.containers, "GROUP_REMOVE left our container open")

        self.step("MEM_REMOVE")
        self.transact(MEM_REMOVE, mem, scope={"region": REGION})

        self.step("CLOSE")
        self.sc.sock.close()            # the sidecar is done with the files we sent it
        m.call(M_CLOSE, [0], [group_fd])
        os.close(group_fd)
        del self.groups[GROUP]
        for fd in [self.device, self.vcpu, self.vm, self.kvm]:
            if fd is not None:
                m.call(M_CLOSE, [0], [fd])
                os.close(fd)
        m.call(M_MM_UNMAP, [ua])
        ram_map.close()
        os.close(ram)
        self.model.sock.close()

    def status_body(self):
        """GET_STATUS: its body is JSON of any length (§7.3)."""
        reply = self.sc.request(GET_STATUS, struct.pack("<II", 0, 0))
        check(reply["status"] == 0 and not reply["ops"], "GET_STATUS failed: %s" % reply["text"])
        return reply["body"].decode("utf-8")


def main():
    ap = argparse.ArgumentParser(description="A tce-sidecar front-end on the model kernel")
    ap.add_argument("--socket", required=True, help="the sidecar's socket")
    ap.add_argument("--model", required=True, help="the model kernel's socket")
    ap.add_argument("--mode", required=True, choices=("accelerated", "isolated"))
    ap.add_argument("--group", type=int, default=0, help="IOMMU group (default 1 accelerated, 2 isolated)")
    ap.add_argument("--refuse-kind", type=int, default=0,
                    help="test aid: refuse forward owner operations of this kind with -EPERM")
    ap.add_argument("-v", "--verbose", action="store_true", help="trace requests and operations")
    args = ap.parse_args()
    VERBOSE[0] = args.verbose
    fe = None
    try:
        fe = FrontEnd(args)
        fe.run()
    except (Fail, OSError, ValueError, KeyError, struct.error) as e:
        print('PYTHON mode=%s result=FAIL step=%s why="%s"'
              % (args.mode, STEP[0], str(e).replace('"', "'")))
        return 1
    print("PYTHON mode=%s result=PASS requests=%d owner_ops=%d" % (args.mode, fe.sc.requests, fe.owner_ops))
    return 0


if __name__ == "__main__":
    sys.exit(main())
