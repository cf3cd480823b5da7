//! The client's socket, to notice a client that left while its non-streaming
//! completion generates (a streaming one notices when a write fails).

/// The client's socket, to notice a client that left while its non-streaming
/// completion generates (a streaming one notices when a write fails).
#[derive(Clone, Copy, Debug)]
pub struct PeerFd(std::os::fd::RawFd);

/// `HttpServer::on_connect`: remember each plain TCP connection's socket.
pub fn remember_peer(conn: &dyn std::any::Any, ext: &mut actix_web::dev::Extensions) {
    use std::os::fd::AsRawFd;
    if let Some(s) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
        ext.insert(PeerFd(s.as_raw_fd()));
    }
}

impl PeerFd {
    /// The peer closed its end (end of file) or the connection failed. The socket
    /// stays open while the request is handled, so the descriptor is still ours.
    pub(crate) fn gone(self) -> bool {
        let mut b = [0u8; 1];
        // SAFETY: a one-byte peek into a live buffer; the descriptor belongs to the
        // connection that is serving this request and is not closed before it ends.
        let n = unsafe {
            libc::recv(
                self.0,
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => true,
            n if n > 0 => false, // a pipelined next request: still there
            _ => !matches!(
                std::io::Error::last_os_error().kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ),
        }
    }
}
