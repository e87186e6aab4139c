//! The malicious frontend: cases shared by the hostile suites of both daemons
//! (`tests/hostile_blk.rs`, `tests/hostile_net.rs`), each a function that does one bad thing to
//! a running daemon and reports how the daemon answered.
//!
//! Each suite runs one `#[test]` per case against a daemon shared by the suite's tests (one at a
//! time: a daemon serves one frontend at a time). After every case the suite checks that the
//! daemon is still running (`try_wait`), serves a correct request correctly, and is back to its
//! baseline of descriptors, mappings and threads. A daemon found dead is restarted for the next
//! case, so one failure does not hide the others.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use bulkhead_common::protocol::wire::Header;
use vhost::vhost_user::message::{
    FrontendReq, VhostUserInflight, VhostUserMemory, VhostUserMemoryRegion,
    VhostUserProtocolFeatures, VhostUserSingleMemoryRegion, VhostUserVringAddr,
    VhostUserVringState,
};
use vm_memory::ByteValued;

use crate::daemon::{eventually, Daemon};
use crate::frontend::connection::Connection;
use crate::frontend::queue::borrow;
use crate::frontend::ram::memfd;
use crate::frontend::GuestRam;

/// How the daemon answered a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A REPLY_ACK with a failure status.
    AckFailure,
    /// An empty reply to a request that has its own reply.
    ErrorReply,
    /// The daemon closed the connection (a read after the answer sees end of file).
    Closed,
    /// Accepted; the damage is contained elsewhere (ring not started, queue stopped).
    Contained,
}

/// Header flag bits (vhost-user.rst, "Header").
pub const VERSION_1: u32 = 0x1;
pub const FLAG_REPLY: u32 = 0x4;
pub const FLAG_NEED_REPLY: u32 = 0x8;
/// A header of a version we do not speak.
pub const VERSION_2: u32 = 0x2;
/// A flag bit the protocol does not define.
pub const UNDEFINED_FLAG: u32 = 0x100;
/// Far above any payload the protocol has (the daemon caps messages well below).
pub const HUGE_PAYLOAD: u32 = 1 << 20;
/// A request code no protocol version defines.
pub const UNKNOWN_REQUEST: u32 = 999;
/// More descriptors than one message may carry (the protocol allows 8).
pub const TOO_MANY_FDS: usize = 9;
/// Virtio feature bits.
pub const F_VERSION_1: u64 = 1 << 32;
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// A feature bit no device offers.
pub const F_NEVER_OFFERED: u64 = 1 << 63;
/// Queue sizes a frontend may not use.
pub const QUEUE_SIZE_NOT_POWER_OF_TWO: u32 = 100;
pub const QUEUE_SIZE_TOO_LARGE: u32 = 32768;
pub const QUEUE_INDEX_TOO_LARGE: u32 = 200;
/// A queue size and its inflight block's bytes (vhost-user.rst, "Inflight I/O tracking").
pub const QUEUE_SIZE: u16 = 128;
pub const INFLIGHT_STRIDE_128: u64 = 2112;
/// Memory slots the daemons offer (GET_MAX_MEM_SLOTS).
pub const MEM_SLOTS: u64 = 32;
/// How long an answer may take before the case counts as a hang.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
const MIB: u64 = 1 << 20;

/// A running daemon the cases are played against.
pub trait Target {
    fn connect(&self) -> Result<Connection>;
    /// The scratch directory to remove when the test process exits.
    fn scratch(&self) -> std::path::PathBuf;
    /// Correct requests are served correctly (`round` varies the data).
    fn alive(&mut self, round: u64) -> Result<()>;
    fn daemon(&mut self) -> &mut Daemon;
    /// Protocol features the frontend acks (all offered ones by default).
    fn protocol_mask(&self) -> u64 {
        u64::MAX
    }
}

/// A daemon shared by the tests of one suite, created (and re-created after a death) on use.
#[derive(Debug)]
pub struct Shared<T> {
    target: Option<T>,
    baseline: (usize, usize, usize),
    rounds: u64,
}

/// Daemons (and their scratch directories) of shared fixtures, which live in statics that are
/// never dropped: killed and removed when the test process exits.
static AT_EXIT: Mutex<Vec<(u32, std::path::PathBuf)>> = Mutex::new(Vec::new());

extern "C" fn kill_shared_daemons() {
    if let Ok(list) = AT_EXIT.lock() {
        for (pid, dir) in list.iter() {
            if let Ok(pid) = i32::try_from(*pid) {
                // SAFETY: kill has no memory effects; a stale pid at worst gets ESRCH.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn at_exit_kill(pid: u32, dir: std::path::PathBuf) {
    static REGISTERED: std::sync::Once = std::sync::Once::new();
    REGISTERED.call_once(|| {
        // SAFETY: registers a plain extern "C" function to run at process exit.
        unsafe { libc::atexit(kill_shared_daemons) };
    });
    if let Ok(mut list) = AT_EXIT.lock() {
        list.push((pid, dir));
    }
}

fn counts(d: &Daemon) -> Result<(usize, usize, usize)> {
    Ok((d.fd_count()?, d.map_count()?, d.thread_count()?))
}

impl<T: Target> Shared<T> {
    pub const fn new() -> Self {
        Self {
            target: None,
            baseline: (0, 0, 0),
            rounds: 0,
        }
    }

    /// Locks the suite's shared state (a panicking case does not poison the others).
    pub fn lock(cell: &'static OnceLock<Mutex<Self>>) -> MutexGuard<'static, Self> {
        cell.get_or_init(|| Mutex::new(Self::new()))
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn ensure_running(&mut self, start: &dyn Fn() -> Result<T>) -> Result<&mut T> {
        let dead = match self.target.as_mut() {
            Some(t) => t.daemon().try_wait()?.is_some(),
            None => true,
        };
        if dead {
            let mut t = start()?;
            t.alive(0)?;
            let mut base = (0, 0, 0);
            eventually(Duration::from_secs(5), "the daemon to settle", || {
                let now = counts(t.daemon())?;
                let settled = now == base;
                base = now;
                Ok(settled)
            })?;
            self.baseline = base;
            let pid = t.daemon().pid();
            at_exit_kill(pid, t.scratch());
            self.target = Some(t);
        }
        self.target.as_mut().context("no daemon")
    }

    /// Plays `case` and checks the answer and the daemon's state afterwards.
    pub fn run(
        &mut self,
        start: &dyn Fn() -> Result<T>,
        name: &str,
        want: Answer,
        case: impl FnOnce(&mut T) -> Result<Answer>,
    ) -> Result<()> {
        let t = self.ensure_running(start)?;
        let got = case(t).with_context(|| format!("case {name:?}"))?;
        if let Some(status) = t.daemon().try_wait()? {
            bail!(
                "the daemon died in {name:?}: {status}\n{}",
                t.daemon().log()
            );
        }
        ensure!(got == want, "{name:?}: answered {got:?}, expected {want:?}");
        self.rounds += 1;
        let round = self.rounds;
        let baseline = self.baseline;
        let t = self.target.as_mut().context("no daemon")?;
        t.alive(round)
            .with_context(|| format!("after {name:?}; log:\n{}", t.daemon().log()))?;
        let mut last = (0, 0, 0);
        let back = eventually(
            Duration::from_secs(5),
            "descriptors, mappings, threads back to baseline",
            || {
                last = counts(t.daemon())?;
                Ok(last == baseline)
            },
        );
        ensure!(
            back.is_ok(),
            "{name:?}: baseline {baseline:?}, afterwards {last:?}"
        );
        eprintln!("{name}: {got:?}");
        Ok(())
    }
}

impl<T: Target> Default for Shared<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// A fresh connection with the protocol features (masked by the target) and REPLY_ACK
/// negotiated, and its owner set.
pub fn negotiated(t: &dyn Target) -> Result<Connection> {
    negotiated_with(t, t.protocol_mask())
}

/// Like [`negotiated`], acking only the offered protocol features within `mask`.
pub fn negotiated_with(t: &dyn Target, mask: u64) -> Result<Connection> {
    let mut c = t.connect()?;
    c.channel()
        .stream()
        .set_read_timeout(Some(ANSWER_TIMEOUT))?;
    c.get_u64(FrontendReq::GET_FEATURES)?;
    let proto = c.get_u64(FrontendReq::GET_PROTOCOL_FEATURES)?;
    c.set_u64(FrontendReq::SET_PROTOCOL_FEATURES, proto & mask)?;
    c.reply_ack = proto & mask & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0;
    c.send(FrontendReq::SET_OWNER, &[], &[])?;
    Ok(c)
}

/// The answer to whatever was sent on `c`: a reply, the connection closing (confirmed by a
/// second read seeing end of file), or an error if nothing comes within [`ANSWER_TIMEOUT`].
pub fn answer(c: &mut Connection, what: &str) -> Result<Answer> {
    match c.channel().recv() {
        Ok(Some(m)) if m.payload.is_empty() => Ok(Answer::ErrorReply),
        Ok(Some(m)) if m.payload.len() == 8 && m.payload != [0; 8] => Ok(Answer::AckFailure),
        Ok(Some(m)) => bail!("{what} was accepted: {:?}", m.payload),
        Ok(None) => closed(c),
        Err(bulkhead_common::protocol::channel::ChannelError::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            bail!("{what}: no answer within {ANSWER_TIMEOUT:?} (the daemon hangs)")
        }
        Err(_) => closed(c),
    }
}

/// Confirms that the daemon closed `c`: reading again sees end of file (or a reset).
fn closed(c: &mut Connection) -> Result<Answer> {
    match c.channel().recv() {
        Ok(None) | Err(_) => Ok(Answer::Closed),
        Ok(Some(m)) => bail!("the connection is still open: {:?}", m.header),
    }
}

/// Sends a request with NEED_REPLY and returns the daemon's answer to it.
pub fn ask(
    c: &mut Connection,
    req: FrontendReq,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<Answer> {
    let h = Header::request(req.into(), u32::try_from(payload.len())?, true);
    if c.channel().send(&h, payload, fds).is_err() {
        return Ok(Answer::Closed);
    }
    answer(c, &format!("{req:?}"))
}

/// Sends raw bytes on a fresh connection; with `then_close` hangs up at once.
pub fn raw(t: &dyn Target, bytes: &[u8], then_close: bool) -> Result<Answer> {
    let mut c = t.connect()?;
    c.channel()
        .stream()
        .set_read_timeout(Some(ANSWER_TIMEOUT))?;
    c.channel().send_raw(bytes, &[])?;
    if then_close {
        drop(c);
        return Ok(Answer::Closed);
    }
    match answer(&mut c, "raw bytes")? {
        Answer::Closed => Ok(Answer::Closed),
        other => bail!("daemon answered {other:?} to a broken message"),
    }
}

pub fn region(gpa: u64, size: u64, uva: u64, off: u64) -> VhostUserMemoryRegion {
    VhostUserMemoryRegion::new(gpa, size, uva, off)
}

pub fn mem_table(regions: &[VhostUserMemoryRegion]) -> Vec<u8> {
    let mut p = VhostUserMemory::new(regions.len() as u32)
        .as_slice()
        .to_vec();
    for r in regions {
        p.extend_from_slice(r.as_slice());
    }
    p
}

fn header(request: u32, flags: u32, size: u32) -> Header {
    Header {
        request,
        flags,
        size,
    }
}

fn sized_memfd(len: u64) -> Result<std::os::fd::OwnedFd> {
    let fd = memfd("hostile")?;
    std::fs::File::from(fd.try_clone()?).set_len(len)?;
    Ok(fd)
}

/// Sets up queue 0 of `c` in `ram` (split ring at the start of RAM) with an error eventfd, and
/// returns (kick, err) eventfds.
fn start_queue_0(
    c: &mut Connection,
    ram: &GuestRam,
    features: u64,
) -> Result<(
    vmm_sys_util::eventfd::EventFd,
    vmm_sys_util::eventfd::EventFd,
)> {
    c.set_mem_table(&[ram.regions()[0]], ram.fd())?;
    c.set_u64(FrontendReq::SET_FEATURES, features)?;
    let err = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?;
    let kick = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?;
    c.set_vring_fd(FrontendReq::SET_VRING_ERR, 0, Some(borrow(&err)))?;
    c.set_vring_state(FrontendReq::SET_VRING_NUM, 0, u32::from(QUEUE_SIZE))?;
    Ok((kick, err))
}

// --- messages --------------------------------------------------------------------------------

pub fn header_of_an_unknown_protocol_version(t: &dyn Target) -> Result<Answer> {
    raw(t, header(1, VERSION_2, 0).as_slice(), false)
}

pub fn header_with_undefined_flag_bits(t: &dyn Target) -> Result<Answer> {
    raw(
        t,
        header(1, VERSION_1 | UNDEFINED_FLAG, 0).as_slice(),
        false,
    )
}

pub fn payload_size_of_a_mebibyte(t: &dyn Target) -> Result<Answer> {
    raw(
        t,
        header(FrontendReq::SET_OWNER.into(), VERSION_1, HUGE_PAYLOAD).as_slice(),
        false,
    )
}

pub fn half_a_header_then_end_of_file(t: &dyn Target) -> Result<Answer> {
    raw(t, &header(1, VERSION_1, 8).as_slice()[..6], true)
}

pub fn end_of_file_in_the_middle_of_a_payload(t: &dyn Target) -> Result<Answer> {
    let mut b = header(2, VERSION_1, 8).as_slice().to_vec();
    b.extend_from_slice(&[1, 2, 3]);
    raw(t, &b, true)
}

pub fn unknown_request_code(t: &dyn Target) -> Result<Answer> {
    let mut c = negotiated(t)?;
    let h = Header::request(UNKNOWN_REQUEST, 0, true);
    c.channel().send(&h, &[], &[])?;
    answer(&mut c, "an unknown request")
}

pub fn payload_of_the_wrong_size(t: &dyn Target) -> Result<Answer> {
    ask(&mut negotiated(t)?, FrontendReq::SET_FEATURES, &[0; 5], &[])
}

pub fn features_that_were_not_offered(t: &dyn Target) -> Result<Answer> {
    ask(
        &mut negotiated(t)?,
        FrontendReq::SET_FEATURES,
        &F_NEVER_OFFERED.to_ne_bytes(),
        &[],
    )
}

pub fn a_descriptor_where_none_belongs(t: &dyn Target) -> Result<Answer> {
    let f = std::fs::File::open("/dev/null")?;
    ask(
        &mut negotiated(t)?,
        FrontendReq::GET_QUEUE_NUM,
        &[],
        &[f.as_fd()],
    )
}

pub fn vring_kick_without_its_descriptor(t: &dyn Target) -> Result<Answer> {
    ask(
        &mut negotiated(t)?,
        FrontendReq::SET_VRING_KICK,
        &0u64.to_ne_bytes(),
        &[],
    )
}

pub fn too_many_descriptors_on_one_message(t: &dyn Target) -> Result<Answer> {
    let files: Vec<std::fs::File> = (0..TOO_MANY_FDS)
        .map(|_| std::fs::File::open("/dev/null"))
        .collect::<Result<_, _>>()?;
    let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
    let mut c = negotiated(t)?;
    let h = Header::request(FrontendReq::SET_VRING_CALL.into(), 8, true);
    c.channel()
        .send_raw(&[h.as_slice(), &0u64.to_ne_bytes()].concat(), &fds)?;
    answer(&mut c, "nine descriptors")
}

/// A protocol request whose feature the frontend did not ack (`mask` leaves it out).
pub fn request_of_a_feature_not_negotiated(
    t: &dyn Target,
    left_out: VhostUserProtocolFeatures,
    req: FrontendReq,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<Answer> {
    let mut c = negotiated_with(t, t.protocol_mask() & !left_out.bits())?;
    // Without REPLY_ACK negotiated a refusal of a request without its own reply is silent:
    // keep REPLY_ACK in, and check the refusal, not the silence.
    ensure!(c.reply_ack, "REPLY_ACK is needed to see the answer");
    ask(&mut c, req, payload, fds)
}

pub fn inflight_region_without_inflight_negotiated(t: &dyn Target) -> Result<Answer> {
    request_of_a_feature_not_negotiated(
        t,
        VhostUserProtocolFeatures::INFLIGHT_SHMFD,
        FrontendReq::GET_INFLIGHT_FD,
        VhostUserInflight::new(0, 0, 1, QUEUE_SIZE).as_slice(),
        &[],
    )
}

pub fn backend_channel_without_backend_req_negotiated(t: &dyn Target) -> Result<Answer> {
    let (a, _b) = std::os::unix::net::UnixStream::pair()?;
    request_of_a_feature_not_negotiated(
        t,
        VhostUserProtocolFeatures::BACKEND_REQ,
        FrontendReq::SET_BACKEND_REQ_FD,
        &[],
        &[a.as_fd()],
    )
}

// --- floods ----------------------------------------------------------------------------------

pub fn two_hundred_memory_tables_in_a_row(t: &dyn Target) -> Result<Answer> {
    let mut c = negotiated(t)?;
    let ram = GuestRam::new(MIB)?;
    let r = ram.regions()[0];
    for _ in 0..200 {
        c.send(
            FrontendReq::SET_MEM_TABLE,
            &mem_table(&[r.to_vhost()]),
            &[ram.fd()],
        )?;
    }
    Ok(Answer::Contained)
}

pub fn two_hundred_inflight_regions_in_a_row(t: &dyn Target) -> Result<Answer> {
    let mut c = negotiated(t)?;
    for _ in 0..200 {
        let q = VhostUserInflight::new(0, 0, 4, QUEUE_SIZE);
        let r = c
            .request(FrontendReq::GET_INFLIGHT_FD, q.as_slice(), &[], true)?
            .context("no reply")?;
        ensure!(r.fds.len() == 1);
    }
    Ok(Answer::Contained)
}

pub fn a_thousand_vring_nums_in_a_row(t: &dyn Target) -> Result<Answer> {
    let mut c = negotiated(t)?;
    for i in 0..1000u32 {
        c.set_vring_state(FrontendReq::SET_VRING_NUM, i % 2, u32::from(QUEUE_SIZE))?;
    }
    Ok(Answer::Contained)
}

// --- memory ----------------------------------------------------------------------------------

pub fn overlapping_regions(t: &dyn Target) -> Result<Answer> {
    let ram = sized_memfd(2 * MIB)?;
    ask(
        &mut negotiated(t)?,
        FrontendReq::SET_MEM_TABLE,
        &mem_table(&[
            region(0, MIB, 0x1000_0000, 0),
            region(MIB / 2, MIB, 0x2000_0000, 0),
        ]),
        &[ram.as_fd(), ram.as_fd()],
    )
}

pub fn region_whose_guest_address_overflows(t: &dyn Target) -> Result<Answer> {
    let ram = sized_memfd(MIB)?;
    ask(
        &mut negotiated(t)?,
        FrontendReq::SET_MEM_TABLE,
        &mem_table(&[region(u64::MAX - 4095, MIB, 0, 0)]),
        &[ram.as_fd()],
    )
}

pub fn region_larger_than_its_memfd(t: &dyn Target) -> Result<Answer> {
    let ram = sized_memfd(4096)?;
    ask(
        &mut negotiated(t)?,
        FrontendReq::SET_MEM_TABLE,
        &mem_table(&[region(0, MIB, 0x1000_0000, 0)]),
        &[ram.as_fd()],
    )
}

pub fn region_backed_by_a_socket(t: &dyn Target) -> Result<Answer> {
    let (a, _b) = std::os::unix::net::UnixStream::pair()?;
    ask(
        &mut negotiated(t)?,
        FrontendReq::SET_MEM_TABLE,
        &mem_table(&[region(0, 4096, 0x1000_0000, 0)]),
        &[a.as_fd()],
    )
}

pub fn more_regions_than_slots(t: &dyn Target) -> Result<Answer> {
    let mut c = negotiated(t)?;
    let ram = sized_memfd(4096)?;
    for i in 0..MEM_SLOTS {
        let r = VhostUserSingleMemoryRegion::new(i * MIB, 4096, 0x1000_0000 + i * MIB, 0);
        c.send(FrontendReq::ADD_MEM_REG, r.as_slice(), &[ram.as_fd()])?;
    }
    let r = VhostUserSingleMemoryRegion::new(64 * MIB, 4096, 0x9000_0000, 0);
    ask(
        &mut c,
        FrontendReq::ADD_MEM_REG,
        r.as_slice(),
        &[ram.as_fd()],
    )
}

pub fn removal_of_an_unknown_region(t: &dyn Target) -> Result<Answer> {
    let r = VhostUserSingleMemoryRegion::new(0x4000_0000, 4096, 0x1000, 0);
    ask(
        &mut negotiated(t)?,
        FrontendReq::REM_MEM_REG,
        r.as_slice(),
        &[],
    )
}

pub fn vring_index_beyond_the_queue_count(t: &dyn Target) -> Result<Answer> {
    ask(
        &mut negotiated(t)?,
        FrontendReq::SET_VRING_NUM,
        VhostUserVringState::new(QUEUE_INDEX_TOO_LARGE, u32::from(QUEUE_SIZE)).as_slice(),
        &[],
    )
}

pub fn queue_size_not_a_power_of_two(t: &dyn Target) -> Result<Answer> {
    ask(
        &mut negotiated(t)?,
        FrontendReq::SET_VRING_NUM,
        VhostUserVringState::new(0, QUEUE_SIZE_NOT_POWER_OF_TWO).as_slice(),
        &[],
    )
}

pub fn queue_size_above_the_maximum(t: &dyn Target) -> Result<Answer> {
    ask(
        &mut negotiated(t)?,
        FrontendReq::SET_VRING_NUM,
        VhostUserVringState::new(0, QUEUE_SIZE_TOO_LARGE).as_slice(),
        &[],
    )
}

pub fn ring_addresses_outside_guest_memory(t: &dyn Target) -> Result<Answer> {
    let mut c = negotiated(t)?;
    let ram = GuestRam::new(MIB)?;
    c.set_mem_table(&[ram.regions()[0]], ram.fd())?;
    let base = ram.regions()[0].user_addr;
    let a = VhostUserVringAddr {
        index: 0,
        flags: 0,
        descriptor: base + 64 * MIB,
        used: base,
        available: base + 4096,
        log: 0,
    };
    ask(&mut c, FrontendReq::SET_VRING_ADDR, a.as_slice(), &[])
}

pub fn misaligned_descriptor_table(t: &dyn Target) -> Result<Answer> {
    // Inside memory but misaligned: the ring refuses to start and raises the error eventfd.
    let mut c = negotiated(t)?;
    let ram = GuestRam::new(MIB)?;
    let (kick, err) = start_queue_0(&mut c, &ram, F_VERSION_1 | F_PROTOCOL_FEATURES)?;
    let base = ram.regions()[0].user_addr;
    c.set_vring_addr(0, base + 8, base + 8192, base + 4096)?;
    c.set_vring_fd(FrontendReq::SET_VRING_KICK, 0, Some(borrow(&kick)))?;
    c.set_vring_state(FrontendReq::SET_VRING_ENABLE, 0, 1)?;
    eventually(Duration::from_secs(5), "the error eventfd", || {
        Ok(err.read().is_ok())
    })?;
    Ok(Answer::Contained)
}

/// Guest RAM that shrinks to nothing under a running queue, then a request is made: the daemon
/// must survive the SIGBUS and drop this frontend (it closes the connection).
pub fn guest_memory_truncated_under_a_running_queue(
    t: &dyn Target,
    start: impl FnOnce(&dyn Target) -> Result<crate::frontend::Frontend>,
    touch: impl FnOnce(&mut crate::frontend::Frontend) -> Result<()>,
) -> Result<Answer> {
    let mut fe = start(t)?;
    fe.conn
        .channel()
        .stream()
        .set_read_timeout(Some(ANSWER_TIMEOUT))?;
    // The frontend keeps the descriptor and takes the memory back.
    std::fs::File::from(fe.ram.fd().try_clone_to_owned()?).set_len(0)?;
    touch(&mut fe)?;
    // The session ends: the next message is answered by a closed connection.
    let deadline = std::time::Instant::now() + ANSWER_TIMEOUT;
    loop {
        let h = Header::request(FrontendReq::GET_FEATURES.into(), 0, false);
        if fe.conn.channel().send(&h, &[], &[]).is_err() {
            return Ok(Answer::Closed);
        }
        match fe.conn.channel().recv() {
            Ok(Some(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(Some(_)) => bail!("the daemon still serves a frontend whose memory is gone"),
            Ok(None) | Err(_) => return closed_after(fe),
        }
    }
}

fn closed_after(mut fe: crate::frontend::Frontend) -> Result<Answer> {
    closed(&mut fe.conn)
}

// --- inflight --------------------------------------------------------------------------------

pub fn inflight_region_for_no_queues(t: &dyn Target) -> Result<Answer> {
    ask(
        &mut negotiated(t)?,
        FrontendReq::GET_INFLIGHT_FD,
        VhostUserInflight::new(0, 0, 0, QUEUE_SIZE).as_slice(),
        &[],
    )
}

pub fn inflight_region_for_queues_of_65535(t: &dyn Target) -> Result<Answer> {
    ask(
        &mut negotiated(t)?,
        FrontendReq::GET_INFLIGHT_FD,
        VhostUserInflight::new(0, 0, 1, u16::MAX).as_slice(),
        &[],
    )
}

pub fn inflight_region_shorter_than_its_layout(t: &dyn Target) -> Result<Answer> {
    let fd = sized_memfd(4096)?;
    ask(
        &mut negotiated(t)?,
        FrontendReq::SET_INFLIGHT_FD,
        VhostUserInflight::new(4096, 0, 4, QUEUE_SIZE).as_slice(),
        &[fd.as_fd()],
    )
}

pub fn inflight_region_beyond_the_end_of_its_file(t: &dyn Target) -> Result<Answer> {
    let fd = sized_memfd(INFLIGHT_STRIDE_128)?;
    ask(
        &mut negotiated(t)?,
        FrontendReq::SET_INFLIGHT_FD,
        VhostUserInflight::new(INFLIGHT_STRIDE_128, 1 << 40, 1, QUEUE_SIZE).as_slice(),
        &[fd.as_fd()],
    )
}

pub fn inflight_offset_that_overflows(t: &dyn Target) -> Result<Answer> {
    let fd = sized_memfd(INFLIGHT_STRIDE_128)?;
    ask(
        &mut negotiated(t)?,
        FrontendReq::SET_INFLIGHT_FD,
        VhostUserInflight::new(INFLIGHT_STRIDE_128, u64::MAX - 4095, 1, QUEUE_SIZE).as_slice(),
        &[fd.as_fd()],
    )
}

/// The inflight region the daemon hands out is sealed: the frontend cannot shrink it.
pub fn inflight_region_handed_out_cannot_be_shrunk(t: &dyn Target) -> Result<Answer> {
    let mut c = negotiated(t)?;
    let q = VhostUserInflight::new(0, 0, 1, QUEUE_SIZE);
    let r = c
        .request(FrontendReq::GET_INFLIGHT_FD, q.as_slice(), &[], true)?
        .context("no reply")?;
    let fd = r.fds.into_iter().next().context("no descriptor")?;
    let refused = std::fs::File::from(fd).set_len(0).is_err();
    ensure!(refused, "the frontend could shrink the inflight region");
    Ok(Answer::Contained)
}

pub fn inflight_region_with_a_corrupt_queue_block(t: &dyn Target) -> Result<Answer> {
    // desc_num disagrees with the queue size: the ring refuses to start (error eventfd).
    let fd = sized_memfd(INFLIGHT_STRIDE_128)?;
    let f = std::fs::File::from(fd.try_clone()?);
    // version 1 at offset 8, desc_num 7 at offset 10.
    std::os::unix::fs::FileExt::write_all_at(&f, &[1, 0, 7, 0], 8)?;
    let mut c = negotiated(t)?;
    c.send(
        FrontendReq::SET_INFLIGHT_FD,
        VhostUserInflight::new(INFLIGHT_STRIDE_128, 0, 1, QUEUE_SIZE).as_slice(),
        &[fd.as_fd()],
    )?;
    let ram = GuestRam::new(4 * MIB)?;
    let (kick, err) = start_queue_0(&mut c, &ram, F_VERSION_1 | F_PROTOCOL_FEATURES)?;
    let base = ram.regions()[0].user_addr;
    c.set_vring_addr(0, base, base + 8192, base + 4096)?;
    c.set_vring_fd(FrontendReq::SET_VRING_KICK, 0, Some(borrow(&kick)))?;
    c.set_vring_state(FrontendReq::SET_VRING_ENABLE, 0, 1)?;
    eventually(Duration::from_secs(5), "the error eventfd", || {
        Ok(err.read().is_ok())
    })?;
    Ok(Answer::Contained)
}

/// An inflight region of the frontend's own (not sealed) that it shrinks while the queue runs.
pub fn inflight_region_truncated_under_a_running_queue(t: &dyn Target) -> Result<Answer> {
    let fd = sized_memfd(INFLIGHT_STRIDE_128)?;
    let mut c = negotiated(t)?;
    c.channel()
        .stream()
        .set_read_timeout(Some(ANSWER_TIMEOUT))?;
    c.send(
        FrontendReq::SET_INFLIGHT_FD,
        VhostUserInflight::new(INFLIGHT_STRIDE_128, 0, 1, QUEUE_SIZE).as_slice(),
        &[fd.as_fd()],
    )?;
    let ram = GuestRam::new(4 * MIB)?;
    let mem = ram.mem().clone();
    let layout = crate::frontend::RingLayout::at(vm_memory::GuestAddress(0), QUEUE_SIZE);
    let mut q = crate::frontend::DriverQueue::new(&mem, QUEUE_SIZE, layout, false)?;
    let (_kick, _err) = start_queue_0(&mut c, &ram, F_VERSION_1 | F_PROTOCOL_FEATURES)?;
    let base = ram.regions()[0].user_addr;
    c.set_vring_addr(0, base, base + 8192, base + 4096)?;
    c.set_vring_fd(FrontendReq::SET_VRING_KICK, 0, Some(borrow(&q.kick)))?;
    c.set_vring_state(FrontendReq::SET_VRING_ENABLE, 0, 1)?;
    std::fs::File::from(fd.try_clone()?).set_len(0)?;
    // Any chain: taking it writes the inflight record, which is gone.
    let buf = crate::frontend::Buf::readable(vm_memory::GuestAddress(MIB), 16);
    q.add(&mem, &[buf])?;
    q.kick_now(&mem)?;
    let h = Header::request(FrontendReq::GET_FEATURES.into(), 0, false);
    let deadline = std::time::Instant::now() + ANSWER_TIMEOUT;
    loop {
        if c.channel().send(&h, &[], &[]).is_err() {
            return Ok(Answer::Closed);
        }
        match c.channel().recv() {
            Ok(Some(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(Some(_)) => {
                bail!("the daemon still serves a frontend whose inflight region is gone")
            }
            Ok(None) | Err(_) => return closed(&mut c),
        }
    }
}

// --- dirty log -------------------------------------------------------------------------------

fn set_log_base(t: &dyn Target, size: u64, offset: u64, fd: BorrowedFd<'_>) -> Result<Answer> {
    ask(
        &mut negotiated(t)?,
        FrontendReq::SET_LOG_BASE,
        vhost::vhost_user::message::VhostUserLog::new(size, offset).as_slice(),
        &[fd],
    )
}

pub fn dirty_log_larger_than_its_file(t: &dyn Target) -> Result<Answer> {
    let fd = sized_memfd(4096)?;
    set_log_base(t, MIB, 0, fd.as_fd())
}

pub fn dirty_log_offset_that_overflows(t: &dyn Target) -> Result<Answer> {
    let fd = sized_memfd(4096)?;
    set_log_base(t, 4096, u64::MAX - 4095, fd.as_fd())
}

pub fn dirty_log_backed_by_a_socket(t: &dyn Target) -> Result<Answer> {
    let (a, _b) = std::os::unix::net::UnixStream::pair()?;
    set_log_base(t, 4096, 0, a.as_fd())
}

pub fn dirty_log_without_log_shmfd_negotiated(t: &dyn Target) -> Result<Answer> {
    let fd = sized_memfd(4096)?;
    request_of_a_feature_not_negotiated(
        t,
        VhostUserProtocolFeatures::LOG_SHMFD,
        FrontendReq::SET_LOG_BASE,
        vhost::vhost_user::message::VhostUserLog::new(4096, 0).as_slice(),
        &[fd.as_fd()],
    )
}

/// A log the frontend shrinks while the daemon marks into it: the session ends.
pub fn dirty_log_truncated_while_logging(t: &dyn Target) -> Result<Answer> {
    let mut fe = crate::frontend::Frontend::start(
        t.connect()?,
        crate::frontend::Setup {
            inflight: false,
            ..crate::frontend::Setup::default()
        },
    )?;
    fe.conn
        .channel()
        .stream()
        .set_read_timeout(Some(ANSWER_TIMEOUT))?;
    let log = fe.start_dirty_log()?;
    std::fs::File::from(log.fd.try_clone()?).set_len(0)?;
    // Any completion now marks the used ring's page in the log, which is gone. The ring lives
    // in guest memory the test still has: post a request that fails (no status byte) and kick.
    let mem = fe.ram.mem().clone();
    let q = fe.queue(0);
    let old = q.avail_idx();
    q.add(
        &mem,
        &[crate::frontend::Buf::readable(
            vm_memory::GuestAddress(MIB),
            16,
        )],
    )?;
    q.notify(&mem, old)?;
    let deadline = std::time::Instant::now() + ANSWER_TIMEOUT;
    loop {
        let h = Header::request(FrontendReq::GET_FEATURES.into(), 0, false);
        if fe.conn.channel().send(&h, &[], &[]).is_err() {
            return Ok(Answer::Closed);
        }
        match fe.conn.channel().recv() {
            Ok(Some(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(Some(_)) => bail!("the daemon still serves a frontend whose log is gone"),
            Ok(None) | Err(_) => return closed(&mut fe.conn),
        }
    }
}
