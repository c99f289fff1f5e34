//! A minimal HTTP/1.1 client for the API socket, for the CLI. Hand-written:
//! the common HTTP clients do not speak over Unix sockets, and one request
//! per connection needs little.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the VMM at {path}: {source} (is `ferry run --api-sock {path}` running?)")]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("API request failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed API response")]
    Malformed,
}

pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The `error` field of a failed request, or the raw body.
    pub fn error_message(&self) -> String {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_else(|| self.body.clone())
    }
}

pub fn request(socket: &Path, method: &str, endpoint: &str, body: &[u8], timeout: Duration) -> Result<Response, Error> {
    let mut stream =
        UnixStream::connect(socket).map_err(|source| Error::Connect { path: socket.to_owned(), source })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let head = format!(
        "{method} {}/{endpoint} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        super::API_PREFIX,
        body.len()
    );
    // A server may answer (413) and close before taking the whole body:
    // then its answer is still there to read.
    let sent = stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(body));
    let mut raw = Vec::new();
    let read = stream.read_to_end(&mut raw);
    match (parse(&raw), sent, read) {
        (Ok(r), _, _) => Ok(r),
        (Err(_), Err(e), _) | (Err(_), Ok(()), Err(e)) => Err(Error::Io(e)),
        (Err(e), Ok(()), Ok(_)) => Err(e),
    }
}

fn parse(raw: &[u8]) -> Result<Response, Error> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or(Error::Malformed)?;
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or(Error::Malformed)?;
    Ok(Response { status, body: body.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_body() {
        let r = parse(b"HTTP/1.1 409 Conflict\r\nContent-Length: 5\r\n\r\n{\"error\":\"x\"}").unwrap();
        assert_eq!(r.status, 409);
        assert_eq!(r.error_message(), "x");
        assert!(parse(b"garbage").is_err());
    }
}
