//! A malicious frontend against the real vhost-user-net binary, one test per case (see
//! `bulkhead_tests::hostile`), plus receive-side cases with frames injected into the TAP:
//! hostile receive buffers among good ones. After each case the daemon runs, transmits and
//! receives a frame correctly, and is back to its baseline of descriptors, mappings, threads.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bulkhead_tests::daemon::Daemon;
use bulkhead_tests::fixture::{pattern, NetFixture};
use bulkhead_tests::frontend::connection::Connection;
use bulkhead_tests::frontend::device::data_base;
use bulkhead_tests::frontend::net::ethernet;
use bulkhead_tests::frontend::queue::{DESC_F_NEXT, DESC_F_WRITE};
use bulkhead_tests::frontend::{Buf, Frontend, NetDriver, Setup, VnetHdr};
use bulkhead_tests::hostile::{self, Answer, Shared, Target};
use vm_memory::{Bytes, GuestAddress};

const SRC: [u8; 6] = [0x52, 0x54, 0, 0xcc, 0, 1];
const ETHERTYPE: u16 = 0x88b5;
const WAIT: Duration = Duration::from_secs(5);
/// GUEST_CSUM, GUEST_TSO4 (so the largest frame is ~64 KiB and the device gathers many
/// buffers for it), MRG_RXBUF, VERSION_1; ring bits come from the setup.
const FEATURES: u64 = 1 << 1 | 1 << 7 | 1 << 15 | 1 << 32;
const RX: u16 = 0;
const QUEUE_SIZE: u16 = 256;
/// Receive buffer size: the daemon gathers buffers for its largest frame (~64 KiB), so a few
/// of these are never enough for it to read a frame.
const RX_BUF: u32 = 4096;
/// Enough good buffers for the largest frame.
const ENOUGH: u16 = 20;
const MIB: u64 = 1 << 20;

fn setup(ram_layout: Vec<(u64, u64)>) -> Setup {
    Setup {
        queues: 2,
        queue_size: QUEUE_SIZE,
        device_features: FEATURES,
        ram_layout,
        queue_num_is_pairs: true,
        inflight: false,
        ..Setup::default()
    }
}

struct Net {
    fx: NetFixture,
}

impl Target for Net {
    fn connect(&self) -> Result<Connection> {
        self.fx.connect()
    }
    fn scratch(&self) -> std::path::PathBuf {
        self.fx.scratch.path.clone()
    }
    fn daemon(&mut self) -> &mut Daemon {
        &mut self.fx.daemon
    }
    fn alive(&mut self, round: u64) -> Result<()> {
        let sock = self.fx.packet_socket(false)?;
        let mut d = self
            .fx
            .driver(setup(vec![(0, 64 * MIB)]), RX_BUF, 64, 8)
            .context("the daemon no longer serves")?;
        d.post_rx(0, 64)?;
        let out = ethernet(SRC, ETHERTYPE, &pattern(round, 100));
        d.send(0, &VnetHdr::default(), &out, 0)?;
        let deadline = Instant::now() + WAIT;
        loop {
            let f = sock.recv(WAIT)?.context("no frame came out of the TAP")?;
            if f == out {
                break;
            }
            ensure!(Instant::now() < deadline, "our frame never came out");
        }
        let into = ethernet(SRC, ETHERTYPE, &pattern(round + 1000, 100));
        sock.send(&into)?;
        receive_ours(&mut d, &into)
    }
}

/// Receives until `frame` arrives (the kernel may send its own frames into the TAP too).
fn receive_ours(d: &mut NetDriver, frame: &[u8]) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Some(got) = d.recv(0, WAIT)? {
            if got.data == frame {
                return Ok(());
            }
            if d.rx_posted(0) < 8 {
                d.post_rx(0, 32)?;
            }
        }
    }
    bail!("the injected frame was not received")
}

static SUITE: OnceLock<Mutex<Shared<Net>>> = OnceLock::new();

fn start() -> Result<Net> {
    let fx = NetFixture::start(&[])?;
    fx.ns.ip(&["link", "set", "tap0", "up"])?;
    Ok(Net { fx })
}

fn play(name: &str, want: Answer, case: impl FnOnce(&mut Net) -> Result<Answer>) -> Result<()> {
    Shared::lock(&SUITE).run(&start, name, want, case)
}

macro_rules! cases {
    ($($name:ident => $want:expr),* $(,)?) => {$(
        #[test]
        fn $name() -> Result<()> {
            play(stringify!($name), $want, |t| hostile::$name(t))
        }
    )*};
}

cases! {
    header_of_an_unknown_protocol_version => Answer::Closed,
    header_with_undefined_flag_bits => Answer::Closed,
    payload_size_of_a_mebibyte => Answer::Closed,
    half_a_header_then_end_of_file => Answer::Closed,
    end_of_file_in_the_middle_of_a_payload => Answer::Closed,
    unknown_request_code => Answer::AckFailure,
    payload_of_the_wrong_size => Answer::AckFailure,
    features_that_were_not_offered => Answer::AckFailure,
    a_descriptor_where_none_belongs => Answer::ErrorReply,
    vring_kick_without_its_descriptor => Answer::AckFailure,
    too_many_descriptors_on_one_message => Answer::AckFailure,
    // Net offers neither inflight tracking nor a backend channel: both are refused outright.
    inflight_region_for_no_queues => Answer::ErrorReply,
    inflight_region_shorter_than_its_layout => Answer::AckFailure,
    backend_channel_without_backend_req_negotiated => Answer::AckFailure,
    two_hundred_memory_tables_in_a_row => Answer::Contained,
    a_thousand_vring_nums_in_a_row => Answer::Contained,
    overlapping_regions => Answer::AckFailure,
    region_whose_guest_address_overflows => Answer::AckFailure,
    region_larger_than_its_memfd => Answer::AckFailure,
    region_backed_by_a_socket => Answer::AckFailure,
    more_regions_than_slots => Answer::AckFailure,
    removal_of_an_unknown_region => Answer::AckFailure,
    vring_index_beyond_the_queue_count => Answer::AckFailure,
    queue_size_not_a_power_of_two => Answer::AckFailure,
    queue_size_above_the_maximum => Answer::AckFailure,
    ring_addresses_outside_guest_memory => Answer::AckFailure,
    misaligned_descriptor_table => Answer::Contained,
    dirty_log_larger_than_its_file => Answer::ErrorReply,
    dirty_log_offset_that_overflows => Answer::ErrorReply,
    dirty_log_backed_by_a_socket => Answer::ErrorReply,
    dirty_log_without_log_shmfd_negotiated => Answer::ErrorReply,
    dirty_log_truncated_while_logging => Answer::Closed,
}

#[test]
fn guest_memory_truncated_under_a_running_queue() -> Result<()> {
    play(
        "guest_memory_truncated_under_a_running_queue",
        Answer::Closed,
        |t| {
            hostile::guest_memory_truncated_under_a_running_queue(
                t,
                |t| Frontend::start(t.connect()?, setup(vec![(0, 64 * MIB)])),
                // A kick on the transmit queue: it reads its available ring, which is gone.
                |fe| Ok(fe.queue(1).kick.write(1)?),
            )
        },
    )
}

// --- receive side ----------------------------------------------------------------------------

/// What the guest posts on the receive queue, in order.
#[derive(Debug, Clone, Copy)]
enum Post {
    /// A writable buffer of `RX_BUF` bytes.
    Good,
    /// A buffer the device may only read.
    ReadableOnly,
    /// A writable buffer too small for the virtio-net header.
    TooSmall,
    /// A buffer outside guest memory.
    Unmapped,
    /// Two descriptors chained to each other.
    Loop,
    /// A good buffer that spans the boundary of two memory regions.
    AcrossRegions,
}

/// The receive ring as a hostile guest fills it, and what came back.
struct RxRing {
    fe: Frontend,
    /// Head → (what was posted, buffer address).
    posted: HashMap<u16, (Post, GuestAddress)>,
    next_buf: u64,
    /// The second descriptors of looping chains.
    loop_seconds: Vec<u16>,
}

impl RxRing {
    fn start(t: &Net, ram_layout: Vec<(u64, u64)>) -> Result<Self> {
        let fe = Frontend::start(t.connect()?, setup(ram_layout))?;
        let next_buf = data_base(&fe.setup).0;
        Ok(Self {
            fe,
            posted: HashMap::new(),
            next_buf,
            loop_seconds: Vec::new(),
        })
    }

    fn buf(&mut self) -> GuestAddress {
        let a = GuestAddress(self.next_buf);
        self.next_buf += u64::from(RX_BUF);
        a
    }

    fn post(&mut self, posts: &[Post]) -> Result<()> {
        let old = self.fe.queue(RX).avail_idx();
        for &p in posts {
            let head = match p {
                Post::Good => {
                    let a = self.buf();
                    self.add(&[Buf::writable(a, RX_BUF)])?
                }
                Post::ReadableOnly => {
                    let a = self.buf();
                    self.add(&[Buf::readable(a, RX_BUF)])?
                }
                Post::TooSmall => {
                    let a = self.buf();
                    self.add(&[Buf::writable(a, 4)])?
                }
                Post::Unmapped => self.add(&[Buf::writable(GuestAddress(1 << 40), RX_BUF)])?,
                Post::AcrossRegions => {
                    // The first region ends at 32 MiB: half the buffer each side.
                    let a = GuestAddress(32 * MIB - u64::from(RX_BUF / 2));
                    self.add(&[Buf::writable(a, RX_BUF)])?
                }
                Post::Loop => {
                    let a = self.buf();
                    let (mem, q) = self.fe.mem_and_queue(RX);
                    let head = q
                        .add(mem, &[Buf::writable(a, 64), Buf::writable(a, 64)])?
                        .context("ring full")?;
                    // Point the second descriptor back at the first.
                    let second = Self::desc_next(mem, q, head).context("second descriptor")?;
                    q.write_desc(mem, second, a.0, 64, DESC_F_WRITE | DESC_F_NEXT, head)?;
                    self.loop_seconds.push(second);
                    head
                }
            };
            let addr = self.posted_addr(head);
            self.posted.insert(head, (p, addr));
        }
        let (mem, q) = self.fe.mem_and_queue(RX);
        q.notify(mem, old)?;
        Ok(())
    }

    fn desc_next(
        mem: &vm_memory::GuestMemoryMmap<()>,
        q: &bulkhead_tests::frontend::DriverQueue,
        i: u16,
    ) -> Option<u16> {
        let at = GuestAddress(q.layout.desc.0 + 16 * u64::from(i) + 14);
        mem.read_obj::<u16>(at).ok()
    }

    fn posted_addr(&self, head: u16) -> GuestAddress {
        let q = &self.fe.queues[usize::from(RX)];
        let at = GuestAddress(q.layout.desc.0 + 16 * u64::from(head));
        GuestAddress(self.fe.ram.mem().read_obj::<u64>(at).unwrap_or(0))
    }

    fn add(&mut self, bufs: &[Buf]) -> Result<u16> {
        let (mem, q) = self.fe.mem_and_queue(RX);
        q.add(mem, bufs)?.context("ring full")
    }

    /// Takes used entries until `done` says enough, failing on any completion of a chain that
    /// is not in flight (the driver's check) or a timeout. Returns (head, len) in order.
    fn reap_until(&mut self, done: impl Fn(&[(u16, u32)]) -> bool) -> Result<Vec<(u16, u32)>> {
        let mut used = Vec::new();
        let deadline = Instant::now() + WAIT;
        while !done(&used) {
            ensure!(
                Instant::now() < deadline,
                "receive ring: only {used:?} came back"
            );
            let (mem, q) = self.fe.mem_and_queue(RX);
            match q.poll(mem)? {
                Some(u) => used.push((u.head, u.len)),
                None => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        Ok(used)
    }
}

/// Posts `first` (which holds too little for the daemon to read a frame, so it takes and puts
/// back buffers, completing the hostile ones among them), then enough good buffers, injects a
/// frame, and checks: every hostile chain came back once with nothing in it, the frame arrived
/// whole in good buffers, and nothing came back twice (the driver rejects a completion of a
/// chain not in flight).
fn hostile_buffers_among_good_ones(
    t: &mut Net,
    first: &[Post],
    ram_layout: Vec<(u64, u64)>,
) -> Result<Answer> {
    let sock = t.fx.packet_socket(false)?;
    let mut r = RxRing::start(t, ram_layout)?;
    r.post(first)?;
    let bad = first
        .iter()
        .filter(|p| !matches!(p, Post::Good | Post::AcrossRegions))
        .count();
    // The hostile chains come back while the good ones wait for a frame. Their descriptors are
    // not reused, so that the device completing one of them again is seen as such.
    let used = r.reap_until(|u| u.len() >= bad)?;
    let ids: Vec<u16> = (0..QUEUE_SIZE)
        .filter(|i| used.iter().any(|(h, _)| h == i) || r.loop_seconds.contains(i))
        .collect();
    r.fe.queue(RX).withhold(&ids);
    for (head, len) in &used {
        let (kind, _) = r.posted[head];
        ensure!(
            !matches!(kind, Post::Good | Post::AcrossRegions) && *len == 0,
            "{kind:?} buffer {head} came back with {len} bytes before any frame"
        );
    }
    r.post(&[Post::Good; ENOUGH as usize])?;
    let frame = ethernet(SRC, ETHERTYPE, &pattern(5, 1000));
    sock.send(&frame)?;
    // Until our frame shows up (frames the kernel sends into the TAP may come first): found by
    // its content.
    let mut got = Vec::new();
    let deadline = Instant::now() + WAIT;
    let ours = loop {
        ensure!(
            Instant::now() < deadline,
            "the frame never arrived: {got:?}"
        );
        let more = r.reap_until(|u| !u.is_empty())?;
        let mut found = None;
        for (head, len) in more {
            got.push((head, len));
            let (kind, addr) = r.posted[&head];
            ensure!(
                matches!(kind, Post::Good | Post::AcrossRegions),
                "{kind:?} buffer {head} came back again (or holds a frame)"
            );
            let mut data = vec![0u8; len as usize];
            r.fe.ram.mem().read_slice(&mut data, addr)?;
            if data.len() >= 12 && data[12..] == frame[..] {
                found = Some(VnetHdr::from_bytes(&data[..12]));
            }
        }
        if let Some(h) = found {
            break h;
        }
    };
    ensure!(ours.num_buffers == 1, "num_buffers {}", ours.num_buffers);
    // Stop the ring (as QEMU does before migrating or when the guest resets the device): the
    // chains the device still holds go back exactly once, and nothing more comes back than was
    // posted (a chain put back after another one was completed must not come out twice).
    r.fe.stop_queue(RX)?;
    let mut back = used.len() + got.len();
    let (mem, q) = r.fe.mem_and_queue(RX);
    while let Some(u) = q.poll(mem)? {
        let (kind, _) = r.posted[&u.head];
        ensure!(
            matches!(kind, Post::Good | Post::AcrossRegions) && u.len == 0,
            "{kind:?} buffer {} came back at the stop with {} bytes",
            u.head,
            u.len
        );
        back += 1;
    }
    ensure!(
        back <= r.posted.len(),
        "{back} chains came back of {} posted",
        r.posted.len()
    );
    Ok(Answer::Contained)
}

#[test]
fn readable_only_receive_buffers_among_good_ones_come_back_once() -> Result<()> {
    play("readable-only receive buffers", Answer::Contained, |t| {
        use Post::*;
        hostile_buffers_among_good_ones(
            t,
            &[Good, ReadableOnly, Good, ReadableOnly, Good],
            vec![(0, 64 * MIB)],
        )
    })
}

#[test]
fn too_small_receive_buffers_among_good_ones_come_back_once() -> Result<()> {
    play("too-small receive buffers", Answer::Contained, |t| {
        use Post::*;
        hostile_buffers_among_good_ones(t, &[Good, TooSmall, Good], vec![(0, 64 * MIB)])
    })
}

#[test]
fn unmapped_receive_buffers_come_back_once() -> Result<()> {
    play("unmapped receive buffers", Answer::Contained, |t| {
        use Post::*;
        hostile_buffers_among_good_ones(t, &[Good, Unmapped, Good], vec![(0, 64 * MIB)])
    })
}

#[test]
fn receive_chains_with_a_loop_come_back_once() -> Result<()> {
    play("receive chains with a loop", Answer::Contained, |t| {
        use Post::*;
        hostile_buffers_among_good_ones(t, &[Loop, Good, Loop], vec![(0, 64 * MIB)])
    })
}

#[test]
fn a_receive_buffer_spanning_two_regions_takes_a_frame_whole() -> Result<()> {
    play(
        "a receive buffer spanning two regions",
        Answer::Contained,
        |t| {
            use Post::*;
            hostile_buffers_among_good_ones(
                t,
                &[AcrossRegions],
                vec![(0, 32 * MIB), (32 * MIB, 32 * MIB)],
            )
        },
    )
}
