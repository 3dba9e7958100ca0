//! Helpers shared by the ingress integration tests.

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Reads one HTTP request head (up to the blank line) off `s`; `None` when
/// the peer closed or failed first.
pub async fn read_head(s: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    Some(String::from_utf8_lossy(&buf).to_string())
}
