//! A malicious frontend against the real vhost-user-blk binary: malformed messages, bad file
//! descriptors, request floods, hostile memory tables and inflight regions, broken rings. After
//! every case the daemon is alive and serves a correct request correctly; at the end the image
//! holds only the valid writes and the daemon's descriptors, mappings and threads are back to
//! their baseline. Prints how each case was answered.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::AsFd;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use bulkhead_common::protocol::wire::Header;
use bulkhead_tests::daemon::eventually;
use bulkhead_tests::fixture::{pattern, BlkFixture};
use bulkhead_tests::frontend::connection::Connection;
use bulkhead_tests::frontend::ram::memfd;
use bulkhead_tests::frontend::{GuestRam, Setup};
use vhost::vhost_user::message::{
    FrontendReq, VhostUserInflight, VhostUserMemory, VhostUserMemoryRegion,
    VhostUserSingleMemoryRegion,
};
use vm_memory::ByteValued;

/// How the daemon answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// A REPLY_ACK with a failure status.
    AckFailure,
    /// An empty reply to a request that has its own reply.
    ErrorReply,
    /// The daemon closed the connection (framing no longer trustworthy).
    Closed,
    /// Accepted; the damage is contained elsewhere (ring not started, queue stopped).
    Contained,
}

const CHECK_SECTOR: u64 = 2048;

/// A fresh connection with REPLY_ACK and the other features negotiated, and its owner set.
fn negotiated(fx: &BlkFixture) -> Result<Connection> {
    let mut c = fx.connect()?;
    c.get_u64(FrontendReq::GET_FEATURES)?;
    let proto = c.get_u64(FrontendReq::GET_PROTOCOL_FEATURES)?;
    c.set_u64(FrontendReq::SET_PROTOCOL_FEATURES, proto)?;
    c.reply_ack = true;
    c.send(FrontendReq::SET_OWNER, &[], &[])?;
    Ok(c)
}

/// Sends a request with NEED_REPLY and returns the daemon's answer to it.
fn ask(
    c: &mut Connection,
    req: FrontendReq,
    payload: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<Answer> {
    let h = Header::request(req.into(), u32::try_from(payload.len())?, true);
    if c.channel().send(&h, payload, fds).is_err() {
        return Ok(Answer::Closed);
    }
    match c.channel().recv() {
        Ok(Some(m)) if m.payload.is_empty() => Ok(Answer::ErrorReply),
        Ok(Some(m)) if m.payload.len() == 8 && m.payload != [0; 8] => Ok(Answer::AckFailure),
        Ok(Some(m)) => bail!("{req:?} was accepted: {:?}", m.payload),
        Ok(None) | Err(_) => Ok(Answer::Closed),
    }
}

/// Sends bytes and reports whether the daemon closed the connection.
fn raw(fx: &BlkFixture, bytes: &[u8], then_close: bool) -> Result<Answer> {
    let mut c = fx.connect()?;
    c.channel().send_raw(bytes, &[])?;
    if then_close {
        return Ok(Answer::Closed);
    }
    match c.channel().recv() {
        Ok(None) | Err(_) => Ok(Answer::Closed),
        Ok(Some(m)) => bail!("daemon answered {:?}", m.header),
    }
}

fn region(gpa: u64, size: u64, uva: u64, off: u64) -> VhostUserMemoryRegion {
    VhostUserMemoryRegion::new(gpa, size, uva, off)
}

fn mem_table(regions: &[VhostUserMemoryRegion]) -> Vec<u8> {
    let mut p = VhostUserMemory::new(regions.len() as u32)
        .as_slice()
        .to_vec();
    for r in regions {
        p.extend_from_slice(r.as_slice());
    }
    p
}

/// A correct request answered correctly: a write and a read-back through a full handshake.
fn alive(fx: &BlkFixture, round: u64) -> Result<()> {
    let mut d = fx
        .driver(Setup::default(), 4, 4096)
        .context("daemon no longer serves")?;
    d.write(0, CHECK_SECTOR + round % 64 * 8, &pattern(round, 4096))?;
    ensure!(d.read(0, CHECK_SECTOR + round % 64 * 8, 4096)? == pattern(round, 4096));
    Ok(())
}

fn counts(fx: &BlkFixture) -> Result<(usize, usize, usize)> {
    Ok((
        fx.daemon.fd_count()?,
        fx.daemon.map_count()?,
        fx.daemon.thread_count()?,
    ))
}

type Case = (
    &'static str,
    Answer,
    Box<dyn Fn(&BlkFixture) -> Result<Answer>>,
);

fn cases() -> Vec<Case> {
    let mut c: Vec<Case> = Vec::new();
    // --- messages ---
    c.push((
        "header with protocol version 2",
        Answer::Closed,
        Box::new(|fx| {
            raw(
                fx,
                Header {
                    request: 1,
                    flags: 2,
                    size: 0,
                }
                .as_slice(),
                false,
            )
        }),
    ));
    c.push((
        "header with unknown flag bits",
        Answer::Closed,
        Box::new(|fx| {
            raw(
                fx,
                Header {
                    request: 1,
                    flags: 0x101,
                    size: 0,
                }
                .as_slice(),
                false,
            )
        }),
    ));
    c.push((
        "payload size of 1 MiB",
        Answer::Closed,
        Box::new(|fx| {
            raw(
                fx,
                Header {
                    request: 5,
                    flags: 1,
                    size: 1 << 20,
                }
                .as_slice(),
                false,
            )
        }),
    ));
    c.push((
        "half a header, then EOF",
        Answer::Closed,
        Box::new(|fx| {
            raw(
                fx,
                &Header {
                    request: 1,
                    flags: 1,
                    size: 8,
                }
                .as_slice()[..6],
                true,
            )
        }),
    ));
    c.push((
        "EOF in the middle of a payload",
        Answer::Closed,
        Box::new(|fx| {
            let mut b = Header {
                request: 2,
                flags: 1,
                size: 8,
            }
            .as_slice()
            .to_vec();
            b.extend_from_slice(&[1, 2, 3]);
            raw(fx, &b, true)
        }),
    ));
    c.push((
        "unknown request code",
        Answer::AckFailure,
        Box::new(|fx| {
            let mut c = negotiated(fx)?;
            let h = Header::request(999, 0, true);
            c.channel().send(&h, &[], &[])?;
            let m = c.channel().recv()?.context("no answer")?;
            Ok(if m.payload != [0; 8] {
                Answer::AckFailure
            } else {
                Answer::Contained
            })
        }),
    ));
    c.push((
        "payload of the wrong size (SET_FEATURES with 5 bytes)",
        Answer::AckFailure,
        Box::new(|fx| {
            ask(
                &mut negotiated(fx)?,
                FrontendReq::SET_FEATURES,
                &[0; 5],
                &[],
            )
        }),
    ));
    c.push((
        "features that were not offered",
        Answer::AckFailure,
        Box::new(|fx| {
            ask(
                &mut negotiated(fx)?,
                FrontendReq::SET_FEATURES,
                &(1u64 << 63).to_ne_bytes(),
                &[],
            )
        }),
    ));
    c.push((
        "a file descriptor where none belongs (GET_QUEUE_NUM)",
        Answer::ErrorReply,
        Box::new(|fx| {
            let f = std::fs::File::open("/dev/null")?;
            ask(
                &mut negotiated(fx)?,
                FrontendReq::GET_QUEUE_NUM,
                &[],
                &[f.as_fd()],
            )
        }),
    ));
    c.push((
        "SET_VRING_KICK without its descriptor",
        Answer::AckFailure,
        Box::new(|fx| {
            ask(
                &mut negotiated(fx)?,
                FrontendReq::SET_VRING_KICK,
                &0u64.to_ne_bytes(),
                &[],
            )
        }),
    ));
    c.push((
        "nine descriptors on one message",
        Answer::AckFailure,
        Box::new(|fx| {
            let files: Vec<std::fs::File> = (0..9)
                .map(|_| std::fs::File::open("/dev/null"))
                .collect::<Result<_, _>>()?;
            let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
            let mut c = negotiated(fx)?;
            let h = Header::request(FrontendReq::SET_VRING_CALL.into(), 8, true);
            c.channel()
                .send_raw(&[h.as_slice(), &0u64.to_ne_bytes()].concat(), &fds)?;
            let m = c.channel().recv()?.context("no answer")?;
            Ok(if m.payload == [0; 8] {
                Answer::Contained
            } else {
                Answer::AckFailure
            })
        }),
    ));
    // --- floods ---
    c.push((
        "200 memory tables in a row",
        Answer::Contained,
        Box::new(|fx| {
            let mut c = negotiated(fx)?;
            let ram = GuestRam::new(1 << 20)?;
            let r = ram.regions()[0];
            for _ in 0..200 {
                c.send(
                    FrontendReq::SET_MEM_TABLE,
                    &mem_table(&[r.to_vhost()]),
                    &[ram.fd()],
                )?;
            }
            Ok(Answer::Contained)
        }),
    ));
    c.push((
        "200 inflight regions in a row",
        Answer::Contained,
        Box::new(|fx| {
            let mut c = negotiated(fx)?;
            for _ in 0..200 {
                let q = VhostUserInflight::new(0, 0, 4, 128);
                let r = c
                    .request(FrontendReq::GET_INFLIGHT_FD, q.as_slice(), &[], true)?
                    .context("no reply")?;
                ensure!(r.fds.len() == 1);
            }
            Ok(Answer::Contained)
        }),
    ));
    c.push((
        "1000 SET_VRING_NUM in a row",
        Answer::Contained,
        Box::new(|fx| {
            let mut c = negotiated(fx)?;
            for i in 0..1000u32 {
                c.set_vring_state(FrontendReq::SET_VRING_NUM, i % 4, 128)?;
            }
            Ok(Answer::Contained)
        }),
    ));
    // --- memory ---
    c.push((
        "overlapping regions",
        Answer::AckFailure,
        Box::new(|fx| {
            let ram = memfd("r")?;
            std::fs::File::from(ram.try_clone()?).set_len(2 << 20)?;
            ask(
                &mut negotiated(fx)?,
                FrontendReq::SET_MEM_TABLE,
                &mem_table(&[
                    region(0, 1 << 20, 0x1000_0000, 0),
                    region(1 << 19, 1 << 20, 0x2000_0000, 0),
                ]),
                &[ram.as_fd(), ram.as_fd()],
            )
        }),
    ));
    c.push((
        "region whose guest address overflows",
        Answer::AckFailure,
        Box::new(|fx| {
            let ram = memfd("r")?;
            std::fs::File::from(ram.try_clone()?).set_len(1 << 20)?;
            ask(
                &mut negotiated(fx)?,
                FrontendReq::SET_MEM_TABLE,
                &mem_table(&[region(u64::MAX - 4095, 1 << 20, 0, 0)]),
                &[ram.as_fd()],
            )
        }),
    ));
    c.push((
        "region larger than its memfd (would SIGBUS)",
        Answer::AckFailure,
        Box::new(|fx| {
            let ram = memfd("r")?;
            std::fs::File::from(ram.try_clone()?).set_len(4096)?;
            ask(
                &mut negotiated(fx)?,
                FrontendReq::SET_MEM_TABLE,
                &mem_table(&[region(0, 1 << 20, 0x1000_0000, 0)]),
                &[ram.as_fd()],
            )
        }),
    ));
    c.push((
        "region backed by a non-file descriptor",
        Answer::AckFailure,
        Box::new(|fx| {
            let (a, _b) = std::os::unix::net::UnixStream::pair()?;
            ask(
                &mut negotiated(fx)?,
                FrontendReq::SET_MEM_TABLE,
                &mem_table(&[region(0, 4096, 0x1000_0000, 0)]),
                &[a.as_fd()],
            )
        }),
    ));
    c.push((
        "more regions than slots",
        Answer::AckFailure,
        Box::new(|fx| {
            let mut c = negotiated(fx)?;
            let ram = memfd("r")?;
            std::fs::File::from(ram.try_clone()?).set_len(4096)?;
            for i in 0..32u64 {
                let r = VhostUserSingleMemoryRegion::new(i << 20, 4096, 0x1000_0000 + (i << 20), 0);
                c.send(FrontendReq::ADD_MEM_REG, r.as_slice(), &[ram.as_fd()])?;
            }
            let r = VhostUserSingleMemoryRegion::new(64 << 20, 4096, 0x9000_0000, 0);
            ask(
                &mut c,
                FrontendReq::ADD_MEM_REG,
                r.as_slice(),
                &[ram.as_fd()],
            )
        }),
    ));
    c.push((
        "removal of an unknown region",
        Answer::AckFailure,
        Box::new(|fx| {
            let r = VhostUserSingleMemoryRegion::new(0x4000_0000, 4096, 0x1000, 0);
            ask(
                &mut negotiated(fx)?,
                FrontendReq::REM_MEM_REG,
                r.as_slice(),
                &[],
            )
        }),
    ));
    c.push((
        "vring index beyond the queue count",
        Answer::AckFailure,
        Box::new(|fx| {
            ask(
                &mut negotiated(fx)?,
                FrontendReq::SET_VRING_NUM,
                vhost::vhost_user::message::VhostUserVringState::new(200, 128).as_slice(),
                &[],
            )
        }),
    ));
    c.push((
        "queue size not a power of two",
        Answer::AckFailure,
        Box::new(|fx| {
            ask(
                &mut negotiated(fx)?,
                FrontendReq::SET_VRING_NUM,
                vhost::vhost_user::message::VhostUserVringState::new(0, 100).as_slice(),
                &[],
            )
        }),
    ));
    c.push((
        "queue size above the maximum",
        Answer::AckFailure,
        Box::new(|fx| {
            ask(
                &mut negotiated(fx)?,
                FrontendReq::SET_VRING_NUM,
                vhost::vhost_user::message::VhostUserVringState::new(0, 32768).as_slice(),
                &[],
            )
        }),
    ));
    c.push((
        "ring addresses outside guest memory",
        Answer::AckFailure,
        Box::new(|fx| {
            let mut c = negotiated(fx)?;
            let ram = GuestRam::new(1 << 20)?;
            c.set_mem_table(&[ram.regions()[0]], ram.fd())?;
            let base = ram.regions()[0].user_addr;
            let a = vhost::vhost_user::message::VhostUserVringAddr {
                index: 0,
                flags: 0,
                descriptor: base + (64 << 20),
                used: base,
                available: base + 4096,
                log: 0,
            };
            ask(&mut c, FrontendReq::SET_VRING_ADDR, a.as_slice(), &[])
        }),
    ));
    c.push((
        "misaligned descriptor table",
        Answer::Contained,
        Box::new(|fx| {
            // Inside memory but misaligned: the ring refuses to start and raises the error eventfd.
            let mut c = negotiated(fx)?;
            let ram = GuestRam::new(1 << 20)?;
            c.set_mem_table(&[ram.regions()[0]], ram.fd())?;
            c.set_u64(FrontendReq::SET_FEATURES, 1 << 32 | 1 << 30)?;
            let err = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?;
            let kick = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?;
            c.set_vring_fd(
                FrontendReq::SET_VRING_ERR,
                0,
                Some(bulkhead_tests::frontend::queue::borrow(&err)),
            )?;
            c.set_vring_state(FrontendReq::SET_VRING_NUM, 0, 128)?;
            let base = ram.regions()[0].user_addr;
            c.set_vring_addr(0, base + 8, base + 8192, base + 4096)?;
            c.set_vring_fd(
                FrontendReq::SET_VRING_KICK,
                0,
                Some(bulkhead_tests::frontend::queue::borrow(&kick)),
            )?;
            c.set_vring_state(FrontendReq::SET_VRING_ENABLE, 0, 1)?;
            eventually(Duration::from_secs(5), "the error eventfd", || {
                Ok(err.read().is_ok())
            })?;
            Ok(Answer::Contained)
        }),
    ));
    // --- inflight ---
    c.push((
        "inflight region for 0 queues",
        Answer::ErrorReply,
        Box::new(|fx| {
            ask(
                &mut negotiated(fx)?,
                FrontendReq::GET_INFLIGHT_FD,
                VhostUserInflight::new(0, 0, 0, 128).as_slice(),
                &[],
            )
        }),
    ));
    c.push((
        "inflight region for queues of 65535",
        Answer::ErrorReply,
        Box::new(|fx| {
            ask(
                &mut negotiated(fx)?,
                FrontendReq::GET_INFLIGHT_FD,
                VhostUserInflight::new(0, 0, 1, 65535).as_slice(),
                &[],
            )
        }),
    ));
    c.push((
        "inflight region shorter than its layout",
        Answer::AckFailure,
        Box::new(|fx| {
            let fd = memfd("i")?;
            std::fs::File::from(fd.try_clone()?).set_len(4096)?;
            ask(
                &mut negotiated(fx)?,
                FrontendReq::SET_INFLIGHT_FD,
                VhostUserInflight::new(4096, 0, 4, 128).as_slice(),
                &[fd.as_fd()],
            )
        }),
    ));
    c.push((
        "inflight region beyond the end of its file",
        Answer::AckFailure,
        Box::new(|fx| {
            let fd = memfd("i")?;
            std::fs::File::from(fd.try_clone()?).set_len(2112)?;
            ask(
                &mut negotiated(fx)?,
                FrontendReq::SET_INFLIGHT_FD,
                VhostUserInflight::new(2112, 1 << 40, 1, 128).as_slice(),
                &[fd.as_fd()],
            )
        }),
    ));
    c.push((
        "inflight offset that overflows",
        Answer::AckFailure,
        Box::new(|fx| {
            let fd = memfd("i")?;
            std::fs::File::from(fd.try_clone()?).set_len(2112)?;
            ask(
                &mut negotiated(fx)?,
                FrontendReq::SET_INFLIGHT_FD,
                VhostUserInflight::new(2112, u64::MAX - 4095, 1, 128).as_slice(),
                &[fd.as_fd()],
            )
        }),
    ));
    c.push((
        "inflight region with a corrupt queue block",
        Answer::Contained,
        Box::new(|fx| {
            // desc_num disagrees with the queue size: the ring refuses to start (error eventfd).
            let fd = memfd("i")?;
            let f = std::fs::File::from(fd.try_clone()?);
            f.set_len(2112)?;
            std::os::unix::fs::FileExt::write_all_at(&f, &[1, 0, 7, 0], 8)?;
            let mut c = negotiated(fx)?;
            c.send(
                FrontendReq::SET_INFLIGHT_FD,
                VhostUserInflight::new(2112, 0, 1, 128).as_slice(),
                &[fd.as_fd()],
            )?;
            let ram = GuestRam::new(4 << 20)?;
            c.set_mem_table(&[ram.regions()[0]], ram.fd())?;
            c.set_u64(FrontendReq::SET_FEATURES, 1 << 32 | 1 << 30)?;
            let err = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?;
            let kick = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?;
            c.set_vring_fd(
                FrontendReq::SET_VRING_ERR,
                0,
                Some(bulkhead_tests::frontend::queue::borrow(&err)),
            )?;
            c.set_vring_state(FrontendReq::SET_VRING_NUM, 0, 128)?;
            let base = ram.regions()[0].user_addr;
            c.set_vring_addr(0, base, base + 8192, base + 4096)?;
            c.set_vring_fd(
                FrontendReq::SET_VRING_KICK,
                0,
                Some(bulkhead_tests::frontend::queue::borrow(&kick)),
            )?;
            c.set_vring_state(FrontendReq::SET_VRING_ENABLE, 0, 1)?;
            eventually(Duration::from_secs(5), "the error eventfd", || {
                Ok(err.read().is_ok())
            })?;
            Ok(Answer::Contained)
        }),
    ));
    // --- rings ---
    c.push((
        "available index jumping past the queue size",
        Answer::Contained,
        Box::new(|fx| {
            let mut d = fx.driver(
                Setup {
                    queue_size: 16,
                    ..Setup::default()
                },
                4,
                4096,
            )?;
            let err = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?;
            d.fe.conn.set_vring_fd(
                FrontendReq::SET_VRING_ERR,
                0,
                Some(bulkhead_tests::frontend::queue::borrow(&err)),
            )?;
            let mem = d.fe.ram.mem().clone();
            let q = d.fe.queue(0);
            q.publish_idx(&mem, 1000)?;
            q.kick.write(1)?;
            eventually(Duration::from_secs(5), "the error eventfd", || {
                Ok(err.read().is_ok())
            })?;
            Ok(Answer::Contained)
        }),
    ));
    c
}

#[test]
fn a_malicious_frontend_crashes_nothing_and_leaks_nothing() -> Result<()> {
    let fx = BlkFixture::start(16 << 20, &["--queues", "4"])?;
    alive(&fx, 0)?;
    let mut baseline = (0, 0, 0);
    eventually(Duration::from_secs(5), "daemon to settle", || {
        let now = counts(&fx)?;
        let settled = now == baseline;
        baseline = now;
        Ok(settled)
    })?;
    let mut table = Vec::new();
    for (round, (name, want, case)) in cases().into_iter().enumerate() {
        let got = case(&fx).with_context(|| format!("case {name:?}"))?;
        ensure!(
            got == want,
            "case {name:?}: answered {got:?}, expected {want:?}"
        );
        ensure!(
            fx.daemon.pid() != 0 && std::fs::metadata(format!("/proc/{}", fx.daemon.pid())).is_ok(),
            "daemon died in {name:?}"
        );
        alive(&fx, round as u64 + 1)
            .with_context(|| format!("after {name:?}; log:\n{}", fx.daemon.log()))?;
        table.push(format!("{name}: {got:?}"));
    }
    let mut last = (0, 0, 0);
    let settled = eventually(
        Duration::from_secs(5),
        "fds, mappings, threads back to baseline",
        || {
            last = counts(&fx)?;
            Ok(last == baseline)
        },
    );
    ensure!(
        settled.is_ok(),
        "baseline {baseline:?}, after the suite {last:?}"
    );
    // Only the check writes reached the image.
    let image = std::fs::read(&fx.image)?;
    let mut expected = vec![0u8; image.len()];
    for round in 0..=table.len() as u64 {
        let at = ((CHECK_SECTOR + round % 64 * 8) * 512) as usize;
        expected[at..at + 4096].copy_from_slice(&pattern(round, 4096));
    }
    ensure!(
        image == expected,
        "the image holds writes that were not valid requests"
    );
    eprintln!("{} bad-input cases:\n  {}", table.len(), table.join("\n  "));
    Ok(())
}
