//! Compressed messages (`grpc-encoding`). pdgate reads gzip, the one encoding every gRPC
//! implementation ships: a compressed message it must inspect is decompressed into a copy
//! (never past the inspection limit: a small message must not expand into gigabytes), read,
//! and passed on as it came — or, where pdgate rewrites it (a minimized response),
//! re-sent uncompressed, which gRPC allows per message whatever the call's encoding.

use flate2::read::GzDecoder;
use std::borrow::Cow;
use std::io::Read;

/// A call's message encoding, from its `grpc-encoding` header.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Encoding {
    /// No header: messages are not compressed (a compressed one is an error).
    #[default]
    Identity,
    Gzip,
    /// An encoding pdgate does not read (`deflate`, `snappy`, ...).
    Other(String),
}

impl Encoding {
    /// The encoding a `grpc-encoding` value names.
    pub fn named(value: Option<&str>) -> Self {
        match value {
            None | Some("identity") => Self::Identity,
            Some("gzip") => Self::Gzip,
            Some(other) => Self::Other(other.to_owned()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompressionError {
    #[error(
        "the message is compressed with `{0}`; pdgate reads this method's messages and decompresses only `gzip`: send it uncompressed or with gzip"
    )]
    Unsupported(String),
    #[error("the message decompresses to more than pdgate's inspection limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the gzip-compressed message cannot be decompressed: {0}")]
    Corrupt(String),
}

/// The bytes of a message to read: `message` itself when it is not compressed, else its
/// decompressed copy, at most `limit` bytes.
pub fn readable<'a>(
    compressed: bool,
    encoding: &Encoding,
    message: &'a [u8],
    limit: usize,
) -> Result<Cow<'a, [u8]>, CompressionError> {
    if !compressed {
        return Ok(Cow::Borrowed(message));
    }
    match encoding {
        Encoding::Gzip => {
            let mut out = Vec::new();
            let bound = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
            GzDecoder::new(message)
                .take(bound)
                .read_to_end(&mut out)
                .map_err(|e| CompressionError::Corrupt(e.to_string()))?;
            if out.len() > limit {
                return Err(CompressionError::TooLarge { limit });
            }
            Ok(Cow::Owned(out))
        }
        Encoding::Identity => Err(CompressionError::Unsupported(
            "no `grpc-encoding` named".to_owned(),
        )),
        Encoding::Other(name) => Err(CompressionError::Unsupported(name.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::Compression;
    use flate2::write::GzEncoder;
    use std::io::Write;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn a_gzip_message_is_read_decompressed_and_an_uncompressed_one_as_it_is() {
        let message = b"\x0a\x06cust-1".repeat(10);
        let zipped = gzip(&message);
        assert_eq!(
            readable(true, &Encoding::Gzip, &zipped, 1024)
                .unwrap()
                .as_ref(),
            &message[..]
        );
        assert!(matches!(
            readable(false, &Encoding::Gzip, &message, 1024).unwrap(),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn a_message_that_expands_past_the_limit_is_refused_without_expanding_it_all() {
        // 64 MiB of zeros compress to about 64 KiB.
        let bomb = gzip(&vec![0u8; 64 << 20]);
        assert!(bomb.len() < 1 << 20);
        assert_eq!(
            readable(true, &Encoding::Gzip, &bomb, 4 << 20),
            Err(CompressionError::TooLarge { limit: 4 << 20 })
        );
    }

    #[test]
    fn other_encodings_and_corrupt_data_are_errors() {
        assert!(matches!(
            readable(true, &Encoding::named(Some("snappy")), b"x", 10),
            Err(CompressionError::Unsupported(name)) if name == "snappy"
        ));
        assert!(matches!(
            readable(true, &Encoding::Identity, b"x", 10),
            Err(CompressionError::Unsupported(_))
        ));
        assert!(matches!(
            readable(true, &Encoding::Gzip, b"not gzip", 10),
            Err(CompressionError::Corrupt(_))
        ));
    }
}
