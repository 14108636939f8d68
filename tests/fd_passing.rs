//! Real fds (memfd, eventfd) across a real socketpair: they arrive close-on-exec and usable, and
//! every fd of a refused message is closed (the process's open-fd count is unchanged).

use std::io::{IoSlice, Read, Seek, SeekFrom, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, MutexGuard};

use rustix::event::{eventfd, EventfdFlags};
use rustix::fs::{fstat, memfd_create, MemfdFlags};
use rustix::io::{fcntl_getfd, FdFlags};
use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use tce_sidecar::protocol::*;

/// The open-fd count is process-wide, so the tests of this binary run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn open_fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// A memfd and an eventfd created *without* close-on-exec, so a close-on-exec flag on the
/// received copy can only come from MSG_CMSG_CLOEXEC.
fn memfd_with(contents: &[u8]) -> OwnedFd {
    let fd = memfd_create("tce-test", MemfdFlags::empty()).unwrap();
    let mut file = std::fs::File::from(fd);
    file.write_all(contents).unwrap();
    file.into()
}

fn plain_eventfd() -> OwnedFd {
    eventfd(0, EventfdFlags::empty()).unwrap()
}

fn mem_add() -> Request {
    Request::MemAdd(MemRegion {
        region_id: 1,
        guest_addr: 0,
        size: 4096,
        user_addr: 0x10000,
        mmap_offset: 0,
        page_shift: 0,
    })
}

fn group_add() -> Request {
    Request::GroupAdd(GroupDesc {
        group_id: 1,
        container_id: 0,
        iommu_group: 5,
    })
}

fn send_request(sock: &UnixStream, request: &Request, fds: &[&OwnedFd]) {
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    send_frame(
        sock,
        request.code() as u32,
        false,
        &encode_request(request),
        &borrowed,
    )
    .unwrap();
}

fn receive(sock: &UnixStream) -> Result<Incoming, DecodeError> {
    decode(recv_frame(sock, false).unwrap())
}

#[test]
fn memfd_arrives_close_on_exec_with_its_contents() {
    let _serial = serial();
    let (front, back) = UnixStream::pair().unwrap();
    let memfd = memfd_with(b"guest ram");
    assert!(!fcntl_getfd(&memfd).unwrap().contains(FdFlags::CLOEXEC));

    send_request(&front, &mem_add(), &[&memfd]);
    let incoming = receive(&back).unwrap();
    assert_eq!(incoming.request, mem_add());
    let received = incoming.fd.expect("MEM_ADD carries its memfd");
    assert!(fcntl_getfd(&received).unwrap().contains(FdFlags::CLOEXEC));
    assert_eq!(
        fstat(&received).unwrap().st_ino,
        fstat(&memfd).unwrap().st_ino
    );

    let mut file = std::fs::File::from(received);
    let mut contents = String::new();
    file.seek(SeekFrom::Start(0)).unwrap();
    file.read_to_string(&mut contents).unwrap();
    assert_eq!(contents, "guest ram");
}

#[test]
fn eventfd_arrives_close_on_exec_and_shares_its_counter() {
    let _serial = serial();
    let (front, back) = UnixStream::pair().unwrap();
    let event = plain_eventfd();
    send_request(&front, &group_add(), &[&event]);
    let received = receive(&back).unwrap().fd.unwrap();
    assert!(fcntl_getfd(&received).unwrap().contains(FdFlags::CLOEXEC));
    rustix::io::write(&event, &5u64.to_ne_bytes()).unwrap();
    let mut counter = [0u8; 8];
    rustix::io::read(&received, &mut counter).unwrap();
    assert_eq!(u64::from_ne_bytes(counter), 5);
}

#[test]
fn back_to_back_messages_keep_their_own_fds() {
    let _serial = serial();
    let (front, back) = UnixStream::pair().unwrap();
    let first = memfd_with(b"a");
    let second = plain_eventfd();
    send_request(&front, &mem_add(), &[&first]);
    send_request(&front, &group_add(), &[&second]);
    let a = receive(&back).unwrap().fd.unwrap();
    let b = receive(&back).unwrap().fd.unwrap();
    assert_eq!(fstat(&a).unwrap().st_ino, fstat(&first).unwrap().st_ino);
    assert_eq!(fstat(&b).unwrap().st_ino, fstat(&second).unwrap().st_ino);
}

/// Sends `request` with `fds`, receives it, and checks that it is refused with `kind` and that
/// the receiving side holds no extra fd afterwards.
#[track_caller]
fn assert_refused_and_closed(request: &Request, fd_count: usize, kind: DecodeErrorKind) {
    let (front, back) = UnixStream::pair().unwrap();
    let fds: Vec<OwnedFd> = (0..fd_count).map(|_| plain_eventfd()).collect();
    let before = open_fd_count();
    send_request(&front, request, &fds.iter().collect::<Vec<_>>());
    let err = receive(&back).expect_err("the request must be refused");
    assert_eq!(err.kind, kind);
    assert_eq!(err.errno(), 9, "fd errors reply -EBADF");
    assert_eq!(open_fd_count(), before, "every received fd was closed");
}

#[test]
fn extra_fd_is_refused_and_closed() {
    let _serial = serial();
    assert_refused_and_closed(
        &group_add(),
        2,
        DecodeErrorKind::FdCount {
            expected: 1,
            got: 2,
        },
    );
    assert_refused_and_closed(
        &Request::GetFeatures,
        1,
        DecodeErrorKind::FdCount {
            expected: 0,
            got: 1,
        },
    );
    assert_refused_and_closed(
        &Request::WindowQuery { container_id: 0 },
        8,
        DecodeErrorKind::FdCount {
            expected: 0,
            got: 8,
        },
    );
}

#[test]
fn missing_fd_is_refused() {
    let _serial = serial();
    assert_refused_and_closed(
        &mem_add(),
        0,
        DecodeErrorKind::FdCount {
            expected: 1,
            got: 0,
        },
    );
}

/// Sends GROUP_ADD with `count` fds by hand (send_frame refuses more than 8).
fn send_group_add_with_fds(front: &UnixStream, count: usize) {
    let fds: Vec<OwnedFd> = (0..count).map(|_| plain_eventfd()).collect();
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    let payload = encode_request(&group_add());
    let header = Header::new(RequestCode::GroupAdd as u32, false, payload.len()).to_bytes();
    let frame = [header.to_vec(), payload].concat();
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(count))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    assert!(control.push(SendAncillaryMessage::ScmRights(&borrowed)));
    let sent = sendmsg(
        front,
        &[IoSlice::new(&frame)],
        &mut control,
        SendFlags::empty(),
    )
    .unwrap();
    assert_eq!(sent, frame.len());
}

#[test]
fn more_than_eight_fds_are_refused_and_closed() {
    let _serial = serial();
    // 9 and 10 fds fit the receive buffer and are counted; 64 overflow it (MSG_CTRUNC) and the
    // kernel closes the ones it could not deliver.
    for count in [9, 10, 64] {
        let (front, back) = UnixStream::pair().unwrap();
        let before = open_fd_count();
        send_group_add_with_fds(&front, count);
        let err = receive(&back).expect_err("too many fds must be refused");
        assert_eq!(err.kind, DecodeErrorKind::TooManyFds, "{count} fds");
        assert_eq!(open_fd_count(), before, "{count} fds");
    }
}

#[test]
fn exact_reader_refuses_and_closes_fds_attached_to_payload_bytes() {
    let _serial = serial();
    let (front, back) = UnixStream::pair().unwrap();
    let memfd = memfd_with(b"x");
    let before = open_fd_count();
    send_mem_add_in_two_writes(&front, &memfd, false);
    let err = receive(&back).expect_err("fds with the payload must be refused");
    assert_eq!(err.kind, DecodeErrorKind::FdsMisplaced);
    assert_eq!(open_fd_count(), before);
}

/// The back-end's reader (buffered, one read per frame) and the exact one (header, then
/// payload).
fn readers() -> [(&'static str, FrameReader); 2] {
    [
        ("buffered", FrameReader::new(false)),
        ("exact", FrameReader::exact(false)),
    ]
}

fn decode(frame: Frame) -> Result<Incoming, DecodeError> {
    decode_request(
        &frame.header,
        &frame.payload,
        frame.fds,
        frame.fd_problem,
        FdRule::Every,
    )
}

#[test]
fn fds_that_arrive_after_a_frames_first_read_are_refused_by_either_reader() {
    let _serial = serial();
    // A 20,500-byte OPS_RESULT whose fd rides on its last 500 bytes: no reader's first read
    // of the frame (at most 8 KiB) reaches them.
    let mut payload = [1u32.to_le_bytes(), 512u32.to_le_bytes()].concat();
    payload.resize(8 + 512 * 40, 0);
    let header = Header::new(RequestCode::OpsResult as u32, false, payload.len()).to_bytes();
    let frame = [header.to_vec(), payload].concat();
    for (name, mut reader) in readers() {
        let (front, back) = UnixStream::pair().unwrap();
        let memfd = memfd_with(b"x");
        let before = open_fd_count();
        send_bytes(&front, &frame[..20_000], &[]).unwrap();
        send_bytes(&front, &frame[20_000..], &[memfd.as_fd()]).unwrap();
        let err = decode(reader.recv(&back).unwrap()).expect_err(name);
        assert_eq!(err.kind, DecodeErrorKind::FdsMisplaced, "{name}");
        assert_eq!(open_fd_count(), before, "{name}");
    }
}

/// Sends MEM_ADD in two writes, the header and then the payload, with `memfd` attached to
/// the header's write or to the payload's.
fn send_mem_add_in_two_writes(front: &UnixStream, memfd: &OwnedFd, with_header: bool) {
    let payload = encode_request(&mem_add());
    let header = Header::new(RequestCode::MemAdd as u32, false, payload.len()).to_bytes();
    let fd = [memfd.as_fd()];
    let (on_header, on_payload): (&[BorrowedFd<'_>], &[BorrowedFd<'_>]) =
        if with_header { (&fd, &[]) } else { (&[], &fd) };
    send_bytes(front, &header, on_header).unwrap();
    send_bytes(front, &payload, on_payload).unwrap();
}

#[test]
fn fds_sent_with_the_header_alone_belong_to_its_message_with_either_reader() {
    let _serial = serial();
    for (name, mut reader) in readers() {
        let (front, back) = UnixStream::pair().unwrap();
        let memfd = memfd_with(b"x");
        send_mem_add_in_two_writes(&front, &memfd, true);
        let incoming = decode(reader.recv(&back).unwrap()).expect(name);
        assert_eq!(incoming.request, mem_add(), "{name}");
        let fd = incoming.fd.expect(name);
        assert_eq!(fstat(&fd).unwrap().st_ino, fstat(&memfd).unwrap().st_ino);
    }
}

#[test]
fn pipelined_messages_each_get_the_fds_sent_with_them_with_either_reader() {
    let _serial = serial();
    // Against §1, but a reader must still not move fds between messages: the fd-carrying
    // message sits between two without fds, all three queued before the first read.
    for (name, mut reader) in readers() {
        let (front, back) = UnixStream::pair().unwrap();
        let event = plain_eventfd();
        send_request(&front, &Request::GetFeatures, &[]);
        send_request(&front, &group_add(), &[&event]);
        send_request(&front, &Request::GetFeatures, &[]);
        let first = decode(reader.recv(&back).unwrap()).expect(name);
        assert_eq!(
            (first.request, first.fd.is_none()),
            (Request::GetFeatures, true)
        );
        let second = decode(reader.recv(&back).unwrap()).expect(name);
        assert_eq!(second.request, group_add(), "{name}");
        let fd = second.fd.expect(name);
        assert_eq!(fstat(&fd).unwrap().st_ino, fstat(&event).unwrap().st_ino);
        let third = decode(reader.recv(&back).unwrap()).expect(name);
        assert_eq!(
            (third.request, third.fd.is_none()),
            (Request::GetFeatures, true)
        );
    }
}

#[test]
fn fds_on_the_payload_are_the_messages_when_it_arrives_in_one_read() {
    let _serial = serial();
    // §2.1: one read shows no boundary inside its bytes, so fds attached to the payload of a
    // message whose header and payload are both queued go with the message. The exact reader
    // reads the header alone and refuses them.
    for (name, mut reader) in readers() {
        let (front, back) = UnixStream::pair().unwrap();
        let memfd = memfd_with(b"x");
        send_mem_add_in_two_writes(&front, &memfd, false);
        let result = decode(reader.recv(&back).unwrap());
        match name {
            "buffered" => assert!(result.expect(name).fd.is_some()),
            _ => assert_eq!(result.expect_err(name).kind, DecodeErrorKind::FdsMisplaced),
        }
    }
}

#[test]
fn broken_frame_with_fds_closes_them() {
    let _serial = serial();
    let (front, back) = UnixStream::pair().unwrap();
    let memfd = memfd_with(b"x");
    let before = open_fd_count();
    let bad_version = [[4u8, 0, 0, 0], 2u32.to_le_bytes(), 0u32.to_le_bytes()].concat();
    send_bytes(&front, &bad_version, &[memfd.as_fd()]).unwrap();
    assert!(matches!(
        recv_frame(&back, false),
        Err(RecvError::Frame(FrameError::BadVersion(2)))
    ));
    assert_eq!(open_fd_count(), before);
}

#[test]
fn a_reader_refusing_fds_closes_them_and_marks_the_frame() {
    let _serial = serial();
    let (front, back) = UnixStream::pair().unwrap();
    let memfd = memfd_with(b"x");
    let mut reader = FrameReader::new(true).refusing_fds();
    let before = open_fd_count();
    let body = [0u8; REPLY_FIXED];
    send_frame(
        &back,
        RequestCode::GetFeatures as u32,
        true,
        &body,
        &[memfd.as_fd()],
    )
    .unwrap();
    send_frame(&back, RequestCode::GetFeatures as u32, true, &body, &[]).unwrap();
    let marked = reader.recv(&front).unwrap();
    assert!(marked.fds.is_empty());
    assert_eq!(marked.fd_problem, Some(FdProblem::TooMany));
    assert_eq!(open_fd_count(), before, "the kernel closed the fd");
    let clean = reader.recv(&front).unwrap();
    assert_eq!((clean.payload.len(), clean.fd_problem), (REPLY_FIXED, None));
}

#[test]
fn send_frame_refuses_more_than_eight_fds() {
    let _serial = serial();
    let (front, _back) = UnixStream::pair().unwrap();
    let fds: Vec<OwnedFd> = (0..9).map(|_| plain_eventfd()).collect();
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    let err = send_frame(
        &front,
        RequestCode::GroupAdd as u32,
        false,
        &[0; 16],
        &borrowed,
    )
    .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
}
