//! The output stream format of `GET /v1/sandboxes/{id}/output` and exec responses
//! (content type [`CONTENT_TYPE`]).
//!
//! A sequence of records `u8 tag | u32 LE length | payload`: stdout and stderr
//! bytes exactly as the workload wrote them, then one `exit` record (JSON
//! [`crate::ExitInfo`]) or one `error` record (JSON [`crate::ApiError`]) at the end.
//! The same records are what a sandbox's output log holds on disk.

use crate::{ApiError, ExitInfo};

pub const CONTENT_TYPE: &str = "application/vnd.hearth.stream";
/// Largest record payload accepted by [`Decoder`].
pub const MAX_RECORD: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(ExitInfo),
    Error(String),
}

const TAG_STDOUT: u8 = 1;
const TAG_STDERR: u8 = 2;
const TAG_EXIT: u8 = 3;
const TAG_ERROR: u8 = 4;

/// Appends one encoded record to `out`.
pub fn encode_into(out: &mut Vec<u8>, tag: u8, payload: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Record::Stdout(b) => encode_into(&mut out, TAG_STDOUT, b),
            Record::Stderr(b) => encode_into(&mut out, TAG_STDERR, b),
            Record::Exit(e) => encode_into(
                &mut out,
                TAG_EXIT,
                &serde_json::to_vec(e).unwrap_or_default(),
            ),
            Record::Error(m) => encode_into(
                &mut out,
                TAG_ERROR,
                &serde_json::to_vec(&ApiError::new(crate::ErrorCode::VmFailed, m.clone()))
                    .unwrap_or_default(),
            ),
        }
        out
    }
}

/// Errors decoding a stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("output stream record with unknown tag {0}")]
    UnknownTag(u8),
    #[error("output stream record of {0} bytes exceeds {MAX_RECORD}")]
    TooLarge(usize),
    #[error("malformed output stream record: {0}")]
    Json(#[from] serde_json::Error),
}

/// Incremental decoder: feed it chunks as they arrive, take out whole records.
#[derive(Default)]
pub struct Decoder {
    buf: Vec<u8>,
    pos: usize,
}

impl Decoder {
    pub fn push(&mut self, chunk: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        self.buf.extend_from_slice(chunk);
    }

    /// Bytes received but not yet part of a whole record.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next whole record, if one has arrived.
    pub fn next_record(&mut self) -> Result<Option<Record>, StreamError> {
        let rest = &self.buf[self.pos..];
        if rest.len() < 5 {
            return Ok(None);
        }
        let tag = rest[0];
        let len = u32::from_le_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        if len > MAX_RECORD {
            return Err(StreamError::TooLarge(len));
        }
        if rest.len() < 5 + len {
            return Ok(None);
        }
        let payload = &rest[5..5 + len];
        let rec = match tag {
            TAG_STDOUT => Record::Stdout(payload.to_vec()),
            TAG_STDERR => Record::Stderr(payload.to_vec()),
            TAG_EXIT => Record::Exit(serde_json::from_slice(payload)?),
            TAG_ERROR => Record::Error(serde_json::from_slice::<ApiError>(payload)?.message),
            t => return Err(StreamError::UnknownTag(t)),
        };
        self.pos += 5 + len;
        if self.pos > 1 << 20 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        Ok(Some(rec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_arbitrary_chunking() {
        let recs = vec![
            Record::Stdout(b"out".to_vec()),
            Record::Stderr(vec![0; 70_000]),
            Record::Exit(ExitInfo {
                code: 130,
                signal: Some(2),
            }),
        ];
        let wire: Vec<u8> = recs.iter().flat_map(|r| r.encode()).collect();
        for chunk in [1, 3, 4096] {
            let mut d = Decoder::default();
            let mut got = Vec::new();
            for c in wire.chunks(chunk) {
                d.push(c);
                while let Some(r) = d.next_record().unwrap() {
                    got.push(r);
                }
            }
            assert_eq!(got, recs);
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn oversized_record_is_refused() {
        let mut d = Decoder::default();
        let mut wire = vec![TAG_STDOUT];
        wire.extend_from_slice(&u32::MAX.to_le_bytes());
        d.push(&wire);
        assert!(d.next_record().is_err());
    }
}
