//! Ports for the tests. A test never binds a port, drops it and hands the number on (another
//! test may take it meanwhile): a server binds `127.0.0.1:0` itself and says where it is (the
//! harness's listeners, `pdgate serve`'s readiness line), and a port that must refuse
//! connections stays reserved by the test for as long as it is used.

use std::net::SocketAddr;
use tokio::net::TcpSocket;

/// A loopback port that refuses connections: bound (so no one else gets it) but not
/// listening. Kept reserved until dropped.
pub struct ClosedPort {
    _socket: TcpSocket,
    pub addr: SocketAddr,
}

impl ClosedPort {
    pub fn new() -> Self {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        Self {
            _socket: socket,
            addr,
        }
    }
}

impl std::fmt::Display for ClosedPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.addr.fmt(f)
    }
}
