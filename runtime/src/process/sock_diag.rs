//! Who listens on a TCP port, asked of the kernel's socket diagnostics
//! (netlink `NETLINK_SOCK_DIAG`, what `ss` uses): a dump of listening
//! sockets only, so its cost follows the number of listeners and not of
//! every connection of the machine, as reading `/proc/net/tcp` does (tens
//! of thousands of lines on a busy proxy, read for each instance started).

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto, socket,
};

/// `SOCK_DIAG_BY_FAMILY` (linux/sock_diag.h).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_LISTEN: u32 = 10;
/// `struct nlmsghdr`.
const HEADER: usize = 16;
/// Where `struct inet_diag_msg` keeps the local port (big-endian) and the
/// socket's owner.
const SPORT: usize = 4;
const UID: usize = 64;
const INODE: usize = 68;
const MESSAGE: usize = 72;

/// A socket listening on the port asked about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listening {
    /// Its owner.
    pub uid: u32,
    /// Its inode, which `/proc/<pid>/fd` links name (`socket:[inode]`).
    pub inode: u64,
}

/// Each TCP socket that listens on `port`, IPv4 and IPv6.
pub fn listeners(port: u16) -> std::io::Result<Vec<Listening>> {
    let mut found = Vec::new();
    for family in [nix::libc::AF_INET, nix::libc::AF_INET6] {
        listeners_of(family, port, &mut found)?;
    }
    Ok(found)
}

fn listeners_of(family: i32, port: u16, found: &mut Vec<Listening>) -> std::io::Result<()> {
    let diag = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&diag);
    sendto(
        fd,
        &request(family),
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    let mut buffer = vec![0u8; 32 * 1024];
    loop {
        let read = recv(fd, &mut buffer, MsgFlags::empty())?;
        if read == 0 {
            return Ok(());
        }
        if parse(&buffer[..read], port, found)? {
            return Ok(());
        }
    }
}

/// A dump request for listening TCP sockets of `family`.
fn request(family: i32) -> [u8; HEADER + 56] {
    const LENGTH: usize = HEADER + 56;
    let mut request = [0u8; LENGTH];
    request[0..4].copy_from_slice(&(LENGTH as u32).to_ne_bytes());
    request[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    request[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    // struct inet_diag_req_v2: family, protocol, extensions, pad, states.
    request[HEADER] = u8::try_from(family).expect("an address family");
    request[HEADER + 1] = u8::try_from(nix::libc::IPPROTO_TCP).expect("a protocol");
    request[HEADER + 4..HEADER + 8].copy_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    request
}

/// Adds the sockets on `port` among the messages in `read`; true once the
/// dump is done.
fn parse(mut read: &[u8], port: u16, found: &mut Vec<Listening>) -> std::io::Result<bool> {
    let truncated = || std::io::Error::other("a truncated sock_diag message");
    while read.len() >= HEADER {
        let length = u32::from_ne_bytes(read[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(read[4..6].try_into().expect("2 bytes"));
        if length < HEADER || length > read.len() {
            return Err(truncated());
        }
        let body = &read[HEADER..length];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let code = body.get(0..4).ok_or_else(truncated)?;
                let code = i32::from_ne_bytes(code.try_into().expect("4 bytes"));
                return Err(std::io::Error::from_raw_os_error(-code));
            }
            SOCK_DIAG_BY_FAMILY => {
                let message = body.get(..MESSAGE).ok_or_else(truncated)?;
                let sport = u16::from_be_bytes([message[SPORT], message[SPORT + 1]]);
                if sport == port {
                    let field = |at: usize| message[at..at + 4].try_into().expect("4 bytes");
                    found.push(Listening {
                        uid: u32::from_ne_bytes(field(UID)),
                        inode: u64::from(u32::from_ne_bytes(field(INODE))),
                    });
                }
            }
            _ => {}
        }
        // Messages are aligned to 4 bytes.
        read = &read[length.next_multiple_of(4).min(read.len())..];
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_on_a_port_are_found_with_their_owner_and_only_theirs() {
        let me = nix::unistd::geteuid().as_raw();
        let v4 = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = v4.local_addr().unwrap().port();
        let inode = std::os::linux::fs::MetadataExt::st_ino(
            &std::fs::metadata(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&v4)
            ))
            .unwrap(),
        );
        let owners =
            |port| -> Vec<u32> { listeners(port).unwrap().iter().map(|l| l.uid).collect() };
        assert_eq!(listeners(port).unwrap(), [Listening { uid: me, inode }]);
        // The same port on IPv6, where the machine has it.
        if let Ok(v6) = std::net::TcpListener::bind(("::1", port)) {
            assert_eq!(owners(port), [me, me]);
            drop(v6);
        }
        // A connected socket on it is no listener.
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _accepted = v4.accept().unwrap();
        assert_eq!(owners(port), [me]);
        drop(v4);
        assert_eq!(owners(port), Vec::<u32>::new());
    }

    #[test]
    fn a_dump_is_read_to_its_end_and_a_broken_one_is_an_error() {
        let message = |kind: u16, body: &[u8]| {
            let mut bytes = ((HEADER + body.len()) as u32).to_ne_bytes().to_vec();
            bytes.extend_from_slice(&kind.to_ne_bytes());
            bytes.extend_from_slice(&[0; 10]);
            bytes.extend_from_slice(body);
            bytes
        };
        let mut socket = [0u8; MESSAGE];
        socket[SPORT..SPORT + 2].copy_from_slice(&8080u16.to_be_bytes());
        socket[UID..UID + 4].copy_from_slice(&1000u32.to_ne_bytes());
        socket[INODE..INODE + 4].copy_from_slice(&77u32.to_ne_bytes());
        let mut other = socket;
        other[SPORT..SPORT + 2].copy_from_slice(&8081u16.to_be_bytes());
        let mut dump = message(SOCK_DIAG_BY_FAMILY, &socket);
        dump.extend(message(SOCK_DIAG_BY_FAMILY, &other));
        let mut found = Vec::new();
        assert!(!parse(&dump, 8080, &mut found).unwrap(), "not done yet");
        dump.extend(message(NLMSG_DONE, &[0; 4]));
        assert!(parse(&dump, 8080, &mut found).unwrap());
        let expected = Listening {
            uid: 1000,
            inode: 77,
        };
        assert_eq!(found, [expected, expected]);
        let refused = message(NLMSG_ERROR, &(-nix::libc::EPERM).to_ne_bytes());
        let error = parse(&refused, 8080, &mut found).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(nix::libc::EPERM));
        let mut cut = message(SOCK_DIAG_BY_FAMILY, &socket);
        cut.truncate(HEADER + 8);
        cut[0..4].copy_from_slice(&((HEADER + 8) as u32).to_ne_bytes());
        assert!(
            parse(&cut, 8080, &mut found).is_err(),
            "a message too short"
        );
        let mut lying = message(SOCK_DIAG_BY_FAMILY, &socket);
        lying[0..4].copy_from_slice(&4096u32.to_ne_bytes());
        assert!(
            parse(&lying, 8080, &mut found).is_err(),
            "a length past the end"
        );
        lying[0..4].copy_from_slice(&4u32.to_ne_bytes());
        let inside = parse(&lying, 8080, &mut found);
        assert!(inside.is_err(), "a length inside the header");
        let bare_end = parse(&message(NLMSG_DONE, &[]), 8080, &mut found);
        assert!(bare_end.unwrap(), "an end with no body");
    }
}
