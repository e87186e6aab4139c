//! Command line → validated configuration.

use std::os::fd::RawFd;

use bulkhead_common::cli::ServeArgs;
use bulkhead_common::vring::MAX_QUEUE_SIZE;

/// vhost-user-net: a virtio-net device backed by a Linux TAP device.
#[derive(Debug, Clone, clap::Parser)]
#[command(version, about)]
pub struct Args {
    #[command(flatten)]
    pub serve: ServeArgs,

    /// TAP interface to attach to, created if it does not exist (multi-queue, with virtio-net
    /// headers). Creating one, or attaching to one owned by another user, needs CAP_NET_ADMIN.
    #[arg(long, value_name = "NAME", conflicts_with = "tap_fd")]
    pub tap: Option<String>,

    /// An open TAP queue descriptor (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR) passed by a privileged
    /// parent; repeat once per queue pair. The daemon then needs no privilege at all.
    #[arg(long, value_name = "FD")]
    pub tap_fd: Vec<RawFd>,

    /// Queue pairs offered (one TAP queue each). With --tap-fd, the number of descriptors.
    #[arg(long, value_name = "N")]
    pub queues: Option<u16>,

    /// Largest queue size accepted (a power of two).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub queue_size: u16,

    /// MAC address offered to the guest (VIRTIO_NET_F_MAC), e.g. 52:54:00:12:34:56.
    #[arg(long, value_name = "MAC", value_parser = parse_mac)]
    pub mac: Option<[u8; 6]>,

    /// MTU offered to the guest (VIRTIO_NET_F_MTU).
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u16).range(68..))]
    pub mtu: Option<u16>,
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(format!("{s:?} is not a MAC address like 52:54:00:12:34:56"));
    }
    let mut mac = [0u8; 6];
    for (dst, p) in mac.iter_mut().zip(parts) {
        *dst = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
    }
    Ok(mac)
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("one of --tap or --tap-fd is required")]
    NoTap,
    #[error("--queues {queues} does not match the {fds} --tap-fd descriptors")]
    QueuesVsFds { queues: u16, fds: usize },
    #[error("--queues must be between 1 and 256, got {0}")]
    Queues(u16),
    #[error("--queue-size must be a power of two between 2 and {MAX_QUEUE_SIZE}, got {0}")]
    QueueSize(u16),
}

/// Where the TAP queues come from.
#[derive(Debug, Clone)]
pub enum TapSource {
    Name(String),
    Fds(Vec<RawFd>),
}

#[derive(Debug, Clone)]
pub struct Config {
    pub serve: ServeArgs,
    pub tap: TapSource,
    pub queue_pairs: u16,
    pub queue_size: u16,
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u16>,
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(a: Args) -> Result<Self, ConfigError> {
        let (tap, queue_pairs) = match (a.tap, a.tap_fd.is_empty()) {
            (Some(name), _) => (TapSource::Name(name), a.queues.unwrap_or(1)),
            (None, false) => {
                let n = u16::try_from(a.tap_fd.len()).map_err(|_| ConfigError::Queues(u16::MAX))?;
                if let Some(q) = a.queues.filter(|q| *q != n) {
                    return Err(ConfigError::QueuesVsFds {
                        queues: q,
                        fds: a.tap_fd.len(),
                    });
                }
                (TapSource::Fds(a.tap_fd), n)
            }
            (None, true) => return Err(ConfigError::NoTap),
        };
        if queue_pairs == 0 || queue_pairs > 256 {
            return Err(ConfigError::Queues(queue_pairs));
        }
        if a.queue_size < 2 || a.queue_size > MAX_QUEUE_SIZE || !a.queue_size.is_power_of_two() {
            return Err(ConfigError::QueueSize(a.queue_size));
        }
        Ok(Config {
            serve: a.serve,
            tap,
            queue_pairs,
            queue_size: a.queue_size,
            mac: a.mac,
            mtu: a.mtu,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut v = vec!["vhost-user-net", "--socket-path", "/tmp/n.sock"];
        v.extend_from_slice(args);
        Config::try_from(Args::try_parse_from(v).unwrap())
    }

    #[test]
    fn mac_is_parsed_and_bad_macs_are_refused() {
        assert_eq!(
            parse(&["--tap", "t0", "--mac", "52:54:00:ab:cd:ef"])
                .unwrap()
                .mac,
            Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef])
        );
        assert!(
            Args::try_parse_from(["vhost-user-net", "--tap", "t0", "--mac", "52:54:00"]).is_err()
        );
    }

    #[test]
    fn tap_fds_set_the_queue_pairs() {
        let c = parse(&["--tap-fd", "5", "--tap-fd", "6"]).unwrap();
        assert_eq!(c.queue_pairs, 2);
        assert!(matches!(
            parse(&["--tap-fd", "5", "--queues", "2"]),
            Err(ConfigError::QueuesVsFds { .. })
        ));
    }

    #[test]
    fn a_tap_is_required() {
        assert!(matches!(parse(&[]), Err(ConfigError::NoTap)));
    }
}
