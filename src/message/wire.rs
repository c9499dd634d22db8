//! The protobuf wire format, as far as pdgate reads and rewrites it: tags, varints, and the
//! extent of each field, without building a message.

/// A wire format pdgate cannot read: the message is refused, never passed on unread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("the message is cut off inside a field")]
    Truncated,
    #[error("a varint is longer than 10 bytes")]
    VarintTooLong,
    #[error("field number 0 or a wire type that does not exist ({0})")]
    BadTag(u64),
    #[error("groups (wire types 3 and 4) are not supported")]
    Group,
    #[error("nested messages go deeper than {0} levels")]
    TooDeep(usize),
    #[error("a subject id is not valid UTF-8")]
    NotText,
}

/// The wire types of protobuf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireType {
    Varint,
    Fixed64,
    Len,
    Fixed32,
}

/// One field as it stands in a message: its number and type, the bytes of its value (for
/// `Len`, without the length prefix) and the bytes of the whole field, tag included.
#[derive(Debug, Clone, Copy)]
pub struct Field<'a> {
    pub number: u32,
    pub wire_type: WireType,
    pub value: &'a [u8],
    pub whole: &'a [u8],
}

/// Reads a varint at the start of `input`: its value and its length in bytes.
pub fn varint(input: &[u8]) -> Result<(u64, usize), WireError> {
    let mut value = 0u64;
    for (i, byte) in input.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    if input.len() >= 10 {
        Err(WireError::VarintTooLong)
    } else {
        Err(WireError::Truncated)
    }
}

/// Appends `value` as a varint.
pub fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// The fields of a message, in wire order.
pub struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    pub fn new(message: &'a [u8]) -> Self {
        Self { rest: message }
    }

    fn next_field(&mut self) -> Result<Field<'a>, WireError> {
        let start = self.rest;
        let (tag, tag_len) = varint(start)?;
        let number = u32::try_from(tag >> 3).map_err(|_| WireError::BadTag(tag))?;
        if number == 0 {
            return Err(WireError::BadTag(tag));
        }
        let after_tag = &start[tag_len..];
        let (wire_type, value_start, value_len) = match tag & 7 {
            0 => {
                let (_, n) = varint(after_tag)?;
                (WireType::Varint, 0, n)
            }
            1 => (WireType::Fixed64, 0, 8),
            2 => {
                let (len, n) = varint(after_tag)?;
                let len = usize::try_from(len).map_err(|_| WireError::Truncated)?;
                (WireType::Len, n, len)
            }
            5 => (WireType::Fixed32, 0, 4),
            3 | 4 => return Err(WireError::Group),
            _ => return Err(WireError::BadTag(tag)),
        };
        let end = value_start
            .checked_add(value_len)
            .filter(|end| *end <= after_tag.len())
            .ok_or(WireError::Truncated)?;
        let value = &after_tag[value_start..end];
        let whole_len = tag_len + end;
        self.rest = &start[whole_len..];
        Ok(Field {
            number,
            wire_type,
            value,
            whole: &start[..whole_len],
        })
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<Field<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let field = self.next_field();
        if field.is_err() {
            // One error, then the end: what follows a bad field cannot be read.
            self.rest = &[];
        }
        Some(field)
    }
}

/// Appends a length-delimited field: tag, length, value.
pub fn put_len_field(out: &mut Vec<u8>, number: u32, value: &[u8]) {
    put_varint(out, (u64::from(number) << 3) | 2);
    put_varint(out, value.len() as u64);
    out.extend_from_slice(value);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip() {
        for value in [
            0,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            assert_eq!(varint(&out), Ok((value, out.len())), "{value}");
        }
        assert_eq!(varint(&[0x80, 0x80]), Err(WireError::Truncated));
        assert_eq!(varint(&[0xff; 11]), Err(WireError::VarintTooLong));
    }

    #[test]
    fn fields_are_read_with_their_extent() {
        // field 1: string "ab"; field 2: varint 150; field 3: fixed32; field 4: fixed64.
        let mut message = Vec::new();
        put_len_field(&mut message, 1, b"ab");
        message.extend_from_slice(&[0x10, 0x96, 0x01]);
        message.extend_from_slice(&[0x1d, 1, 2, 3, 4]);
        message.extend_from_slice(&[0x21, 1, 2, 3, 4, 5, 6, 7, 8]);
        let fields: Vec<Field<'_>> = Fields::new(&message).map(Result::unwrap).collect();
        let numbers: Vec<u32> = fields.iter().map(|f| f.number).collect();
        assert_eq!(numbers, [1, 2, 3, 4]);
        assert_eq!(fields[0].value, b"ab");
        assert_eq!(fields[0].whole, &message[..4]);
        assert_eq!(fields[1].wire_type, WireType::Varint);
        assert_eq!(fields[1].whole, &[0x10, 0x96, 0x01]);
        assert_eq!(fields[3].value, &[1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        for bad in [
            &[0x0a, 0x05, b'a'][..], // length past the end
            &[0x00, 0x01],           // field number 0
            &[0x0b],                 // start group
            &[0x0f, 0x00],           // wire type 7
            &[0x09, 1, 2],           // fixed64 cut off
        ] {
            let read: Result<Vec<_>, _> = Fields::new(bad).collect();
            assert!(read.is_err(), "{bad:?}");
        }
    }
}
