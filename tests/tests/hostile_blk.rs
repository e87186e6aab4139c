//! A malicious frontend against the real vhost-user-blk binary, one test per case (see
//! `bulkhead_tests::hostile`): after each, the daemon runs, serves a correct write and read, is
//! back to its baseline of descriptors, mappings and threads, and its image holds nothing but
//! the check writes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Mutex, OnceLock};

use anyhow::{ensure, Context, Result};
use bulkhead_tests::daemon::Daemon;
use bulkhead_tests::fixture::{pattern, BlkFixture};
use bulkhead_tests::frontend::connection::Connection;
use bulkhead_tests::frontend::{Frontend, Setup};
use bulkhead_tests::hostile::{self, Answer, Shared, Target};

const IMAGE: u64 = 16 << 20;
const QUEUES: &str = "4";
/// Where the check writes go: one 4 KiB block per round, cycling over 64 blocks.
const CHECK_SECTOR: u64 = 2048;
const CHECK_BLOCKS: u64 = 64;

struct Blk {
    fx: BlkFixture,
    /// The pattern round last written to each check block.
    written: Vec<Option<u64>>,
}

impl Target for Blk {
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
        let block = round % CHECK_BLOCKS;
        let sector = CHECK_SECTOR + block * 8;
        let mut d = self
            .fx
            .driver(Setup::default(), 4, 4096)
            .context("the daemon no longer serves")?;
        d.write(0, sector, &pattern(round, 4096))?;
        ensure!(
            d.read(0, sector, 4096)? == pattern(round, 4096),
            "read back"
        );
        self.written[block as usize] = Some(round);
        // Nothing but the check writes reached the image.
        let image = std::fs::read(&self.fx.image)?;
        let mut expected = vec![0u8; image.len()];
        for (b, r) in self.written.iter().enumerate() {
            if let Some(r) = r {
                let at = ((CHECK_SECTOR + b as u64 * 8) * 512) as usize;
                expected[at..at + 4096].copy_from_slice(&pattern(*r, 4096));
            }
        }
        ensure!(
            image == expected,
            "the image holds writes that were not valid requests"
        );
        Ok(())
    }
}

static SUITE: OnceLock<Mutex<Shared<Blk>>> = OnceLock::new();

fn start() -> Result<Blk> {
    Ok(Blk {
        fx: BlkFixture::start(IMAGE, &["--queues", QUEUES])?,
        written: vec![None; CHECK_BLOCKS as usize],
    })
}

fn play(name: &str, want: Answer, case: impl FnOnce(&mut Blk) -> Result<Answer>) -> Result<()> {
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
    inflight_region_without_inflight_negotiated => Answer::ErrorReply,
    backend_channel_without_backend_req_negotiated => Answer::AckFailure,
    two_hundred_memory_tables_in_a_row => Answer::Contained,
    two_hundred_inflight_regions_in_a_row => Answer::Contained,
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
    inflight_region_for_no_queues => Answer::ErrorReply,
    inflight_region_for_queues_of_65535 => Answer::ErrorReply,
    inflight_region_shorter_than_its_layout => Answer::AckFailure,
    inflight_region_beyond_the_end_of_its_file => Answer::AckFailure,
    inflight_offset_that_overflows => Answer::AckFailure,
    inflight_region_handed_out_cannot_be_shrunk => Answer::Contained,
    inflight_region_with_a_corrupt_queue_block => Answer::Contained,
    inflight_region_truncated_under_a_running_queue => Answer::Closed,
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
                |t| {
                    Frontend::start(
                        t.connect()?,
                        Setup {
                            inflight: false,
                            ..Setup::default()
                        },
                    )
                },
                // A kick: the queue reads its available ring, which is gone.
                |fe| Ok(fe.queue(0).kick.write(1)?),
            )
        },
    )
}

#[test]
fn available_index_jumping_past_the_queue_size() -> Result<()> {
    play(
        "available_index_jumping_past_the_queue_size",
        Answer::Contained,
        |t| {
            let mut d = t.fx.driver(
                Setup {
                    queue_size: 16,
                    ..Setup::default()
                },
                4,
                4096,
            )?;
            let err = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?;
            d.fe.conn.set_vring_fd(
                vhost::vhost_user::message::FrontendReq::SET_VRING_ERR,
                0,
                Some(bulkhead_tests::frontend::queue::borrow(&err)),
            )?;
            let mem = d.fe.ram.mem().clone();
            let q = d.fe.queue(0);
            // Far beyond the 16 entries of the ring.
            q.publish_idx(&mem, 1000)?;
            q.kick.write(1)?;
            bulkhead_tests::daemon::eventually(
                std::time::Duration::from_secs(5),
                "the error eventfd",
                || Ok(err.read().is_ok()),
            )?;
            Ok(Answer::Contained)
        },
    )
}
