//! The protected service's messages as pdgate reads them: straight off the wire, by plans
//! compiled from the service's descriptors at policy load (`policy::inspect`). Nothing here
//! builds a message: reading the subjects of a request and clearing fields of a response are
//! one pass over the bytes each, and a response that needs no change is not copied.
//!
//! - [`subjects`]: the data-subject ids at a field path of a request.
//! - [`minimize`]: a response with the fields of the given categories cleared, and every
//!   field the descriptors do not know dropped — a newer service version's field is never
//!   passed on unclassified.
//! - [`categories_set`]: the categories whose fields a request (a write) sets.

pub mod compression;
pub mod frames;
pub mod wire;

use std::borrow::Cow;
use wire::{Field, Fields, WireError, WireType, put_varint};

/// Nested messages deeper than this are refused (protobuf's own default limit is 100).
pub const MAX_DEPTH: usize = 64;

/// A message type's index in its [`Plans`].
pub type MessageId = usize;

/// A set of a route's categories, one bit each (a route has at most 64).
pub type CategorySet = u64;

/// What happens to one field of a message type as a response passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldPlan {
    /// Passes as it is.
    Keep,
    /// Personal data of the route's category with this bit: cleared when the decision
    /// minimizes that category.
    Category(u8),
    /// A message (repeated or not, or a map's entries) with categories inside: rewritten
    /// by its own plan.
    Nested(MessageId),
}

/// The plan of one message type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessagePlan {
    /// The message's full name (`demo.customer.v1.Profile`).
    pub name: String,
    /// By field number, ascending; a number not here is a field the descriptors do not know.
    fields: Vec<(u32, FieldPlan)>,
}

impl MessagePlan {
    pub fn new(name: impl Into<String>, mut fields: Vec<(u32, FieldPlan)>) -> Self {
        fields.sort_unstable_by_key(|(number, _)| *number);
        fields.dedup_by_key(|(number, _)| *number);
        Self {
            name: name.into(),
            fields,
        }
    }

    fn field(&self, number: u32) -> Option<FieldPlan> {
        self.fields
            .binary_search_by_key(&number, |(n, _)| *n)
            .ok()
            .map(|i| self.fields[i].1)
    }
}

/// The plans of the message types one route's responses are made of (recursive types refer
/// to themselves by id).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plans {
    messages: Vec<MessagePlan>,
}

impl Plans {
    /// Adds a plan, returning its id.
    pub fn push(&mut self, plan: MessagePlan) -> MessageId {
        self.messages.push(plan);
        self.messages.len() - 1
    }

    /// Replaces the plan `id` (for a type whose fields refer back to it).
    pub fn set(&mut self, id: MessageId, plan: MessagePlan) {
        if let Some(slot) = self.messages.get_mut(id) {
            *slot = plan;
        }
    }

    pub fn get(&self, id: MessageId) -> Option<&MessagePlan> {
        self.messages.get(id)
    }
}

/// What [`minimize`] did to a message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Minimized {
    /// Fields cleared because their category is minimized.
    pub cleared: u32,
    /// Fields dropped because the descriptors do not know them.
    pub unknown: u32,
}

/// `message` (of type `root`) with every field whose category is in `clear` removed, and
/// every field the plan does not know. Borrowed when nothing had to go.
pub fn minimize<'a>(
    message: &'a [u8],
    plans: &Plans,
    root: MessageId,
    clear: CategorySet,
) -> Result<(Cow<'a, [u8]>, Minimized), WireError> {
    let mut done = Minimized::default();
    let out = rewrite(message, plans, root, clear, 0, &mut done)?;
    Ok((out, done))
}

fn rewrite<'a>(
    message: &'a [u8],
    plans: &Plans,
    id: MessageId,
    clear: CategorySet,
    depth: usize,
    done: &mut Minimized,
) -> Result<Cow<'a, [u8]>, WireError> {
    if depth > MAX_DEPTH {
        return Err(WireError::TooDeep(MAX_DEPTH));
    }
    let plan = plans.get(id);
    // Written lazily: `None` until the first field that changes, then everything before it
    // is copied once.
    let mut out: Option<Vec<u8>> = None;
    let mut kept_until = 0;
    for field in Fields::new(message) {
        let field = field?;
        let start = offset_in(message, field.whole);
        let action = match plan.and_then(|p| p.field(field.number)) {
            None => {
                done.unknown += 1;
                None
            }
            Some(FieldPlan::Keep) => Some(Cow::Borrowed(field.whole)),
            Some(FieldPlan::Category(bit))
                if clear & 1u64.checked_shl(u32::from(bit)).unwrap_or(0) != 0 =>
            {
                done.cleared += 1;
                None
            }
            Some(FieldPlan::Category(_)) => Some(Cow::Borrowed(field.whole)),
            Some(FieldPlan::Nested(inner)) => nested(field, plans, inner, clear, depth, done)?,
        };
        match (action, &mut out) {
            (Some(Cow::Borrowed(_)), None) => kept_until = start + field.whole.len(),
            (Some(Cow::Borrowed(bytes)), Some(out)) => out.extend_from_slice(bytes),
            (Some(Cow::Owned(bytes)), out) => {
                out.get_or_insert_with(|| message[..kept_until].to_vec())
                    .extend_from_slice(&bytes);
            }
            (None, out) => {
                out.get_or_insert_with(|| message[..kept_until].to_vec());
            }
        }
    }
    Ok(out.map_or(Cow::Borrowed(message), Cow::Owned))
}

/// A nested message field, rewritten: `None` to drop it (its wire type is not a message's).
fn nested<'a>(
    field: Field<'a>,
    plans: &Plans,
    inner: MessageId,
    clear: CategorySet,
    depth: usize,
    done: &mut Minimized,
) -> Result<Option<Cow<'a, [u8]>>, WireError> {
    if field.wire_type != WireType::Len {
        // Not what the descriptors say this field is: unclassified, so it goes.
        done.unknown += 1;
        return Ok(None);
    }
    Ok(Some(
        match rewrite(field.value, plans, inner, clear, depth + 1, done)? {
            Cow::Borrowed(_) => Cow::Borrowed(field.whole),
            Cow::Owned(value) => {
                let mut whole = Vec::with_capacity(value.len() + 8);
                put_varint(&mut whole, (u64::from(field.number) << 3) | 2);
                put_varint(&mut whole, value.len() as u64);
                whole.extend_from_slice(&value);
                Cow::Owned(whole)
            }
        },
    ))
}

/// The categories (bits of the plan's [`FieldPlan::Category`]) whose fields `message` (of
/// type `root`) sets, nested messages included. Fields the plan does not know are not
/// counted: a write is decided on the categories the service's descriptors give it.
pub fn categories_set(
    message: &[u8],
    plans: &Plans,
    root: MessageId,
) -> Result<CategorySet, WireError> {
    let mut set = 0;
    collect_set(message, plans, root, 0, &mut set)?;
    Ok(set)
}

fn collect_set(
    message: &[u8],
    plans: &Plans,
    id: MessageId,
    depth: usize,
    set: &mut CategorySet,
) -> Result<(), WireError> {
    if depth > MAX_DEPTH {
        return Err(WireError::TooDeep(MAX_DEPTH));
    }
    let Some(plan) = plans.get(id) else {
        return Ok(());
    };
    for field in Fields::new(message) {
        let field = field?;
        match plan.field(field.number) {
            Some(FieldPlan::Category(bit)) => {
                *set |= 1u64.checked_shl(u32::from(bit)).unwrap_or(0);
            }
            Some(FieldPlan::Nested(inner)) if field.wire_type == WireType::Len => {
                collect_set(field.value, plans, inner, depth + 1, set)?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Where `part` (a sub-slice of `whole`) begins in it.
fn offset_in(whole: &[u8], part: &[u8]) -> usize {
    part.as_ptr() as usize - whole.as_ptr() as usize
}

/// A path of field numbers from a request message to a string field holding subject ids
/// (`updates[].customer_id` is `[1, 1]` when `updates` is field 1 and `customer_id` field 1
/// of its type). Every occurrence counts: repeated fields at any step give several ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectPath(pub Vec<u32>);

/// The subject ids at `path` in `message`, in wire order. A path absent from the message
/// gives none; an id that is not UTF-8 text is an error.
pub fn subjects(message: &[u8], path: &SubjectPath) -> Result<Vec<String>, WireError> {
    let mut found = Vec::new();
    collect(message, &path.0, 0, &mut found)?;
    Ok(found)
}

fn collect(
    message: &[u8],
    path: &[u32],
    depth: usize,
    found: &mut Vec<String>,
) -> Result<(), WireError> {
    if depth > MAX_DEPTH {
        return Err(WireError::TooDeep(MAX_DEPTH));
    }
    let Some((&number, rest)) = path.split_first() else {
        return Ok(());
    };
    for field in Fields::new(message) {
        let field = field?;
        if field.number != number || field.wire_type != WireType::Len {
            continue;
        }
        if rest.is_empty() {
            let id = std::str::from_utf8(field.value).map_err(|_| WireError::NotText)?;
            found.push(id.to_owned());
        } else {
            collect(field.value, rest, depth + 1, found)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
