//! gRPC's framing of messages in an HTTP/2 body ("Length-Prefixed-Message"): a 1-byte
//! compressed flag, a 4-byte big-endian length, the message.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The largest message pdgate reads (4 MiB, gRPC's default receive limit); a larger one is
/// refused `RESOURCE_EXHAUSTED`.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a message of {len} bytes is over pdgate's inspection limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
}

/// Messages out of body chunks, as they arrive, each at most `limit` bytes.
pub struct Frames {
    buf: BytesMut,
    limit: usize,
}

impl Default for Frames {
    fn default() -> Self {
        Self::with_limit(MAX_MESSAGE_BYTES)
    }
}

impl Frames {
    /// Frames of messages of at most `limit` bytes (`[limits] inspect_message_bytes`).
    pub fn with_limit(limit: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            limit,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn push(&mut self, data: &Bytes) {
        self.buf.extend_from_slice(data);
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The next whole message, when one is buffered: `(compressed, message)`.
    pub fn next_message(&mut self) -> Result<Option<(bool, Bytes)>, FrameError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let compressed = self.buf[0] != 0;
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > self.limit {
            return Err(FrameError::TooLarge {
                len,
                limit: self.limit,
            });
        }
        if self.buf.len() - 5 < len {
            return Ok(None);
        }
        self.buf.advance(5);
        Ok(Some((compressed, self.buf.split_to(len).freeze())))
    }
}

/// `message` framed for the wire, uncompressed.
pub fn frame(message: &[u8]) -> Bytes {
    framed(false, message)
}

/// `message` framed for the wire with its compressed flag.
pub fn framed(compressed: bool, message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(message.len() + 5);
    out.put_u8(u8::from(compressed));
    out.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    out.put_slice(message);
    out.freeze()
}

/// The first whole message of a complete body (Envoy's `ext_authz` sends the body it
/// buffered): `None` when the body holds none.
pub fn first(body: &[u8]) -> Result<Option<(bool, Bytes)>, FrameError> {
    let mut frames = Frames::default();
    frames.push(&Bytes::copy_from_slice(body));
    frames.next_message()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_cut_out_of_chunks_as_they_complete() {
        let mut wire = frame(b"abc").to_vec();
        wire.extend_from_slice(&framed(true, b"de"));
        let mut frames = Frames::default();
        frames.push(&Bytes::copy_from_slice(&wire[..4]));
        assert_eq!(frames.next_message(), Ok(None));
        frames.push(&Bytes::copy_from_slice(&wire[4..9]));
        assert_eq!(
            frames.next_message(),
            Ok(Some((false, Bytes::from_static(b"abc"))))
        );
        assert_eq!(frames.next_message(), Ok(None));
        frames.push(&Bytes::copy_from_slice(&wire[9..]));
        assert_eq!(
            frames.next_message(),
            Ok(Some((true, Bytes::from_static(b"de"))))
        );
        assert!(frames.is_empty());
    }

    #[test]
    fn an_oversize_length_is_refused_before_it_is_buffered() {
        let mut frames = Frames::default();
        frames.push(&Bytes::from_static(&[0, 0xff, 0xff, 0xff, 0xff]));
        assert!(matches!(
            frames.next_message(),
            Err(FrameError::TooLarge { .. })
        ));
    }
}
