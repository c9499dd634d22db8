use super::*;
use prost::Message;

/// The demo's profile, and an export of them, as a service would encode them.
#[derive(Clone, PartialEq, prost::Message)]
struct Profile {
    #[prost(string, tag = "1")]
    customer_id: String,
    #[prost(string, tag = "2")]
    name: String,
    #[prost(string, tag = "3")]
    email: String,
    #[prost(string, tag = "4")]
    address: String,
    #[prost(string, tag = "5")]
    phone: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Disclosure {
    #[prost(message, optional, tag = "1")]
    profile: Option<Profile>,
    #[prost(message, repeated, tag = "2")]
    others: Vec<Profile>,
    #[prost(map = "string, string", tag = "3")]
    notes: std::collections::HashMap<String, String>,
}

/// A newer version of the profile, with a field the policy's descriptors do not know.
#[derive(Clone, PartialEq, prost::Message)]
struct ProfileV2 {
    #[prost(string, tag = "1")]
    customer_id: String,
    #[prost(string, tag = "2")]
    name: String,
    #[prost(string, tag = "9")]
    birthday: String,
}

const NAME: u8 = 0;
const EMAIL: u8 = 1;
const ADDRESS: u8 = 2;
const PHONE: u8 = 3;

fn profile() -> Profile {
    Profile {
        customer_id: "cust-1".into(),
        name: "Hanako Yamada".into(),
        email: "hanako@example.jp".into(),
        address: "1-2-3 Chiyoda, Tokyo".into(),
        phone: "+81-3-0000-0000".into(),
    }
}

/// Plans for `Disclosure` (id 0) and `Profile` (id 1); map entries (id 2) keep both fields.
fn plans() -> Plans {
    let mut plans = Plans::default();
    let disclosure = plans.push(MessagePlan::default());
    let profile = plans.push(MessagePlan::new(
        "Profile",
        vec![
            (1, FieldPlan::Keep),
            (2, FieldPlan::Category(NAME)),
            (3, FieldPlan::Category(EMAIL)),
            (4, FieldPlan::Category(ADDRESS)),
            (5, FieldPlan::Category(PHONE)),
        ],
    ));
    let entry = plans.push(MessagePlan::new(
        "NotesEntry",
        vec![(1, FieldPlan::Keep), (2, FieldPlan::Keep)],
    ));
    plans.set(
        disclosure,
        MessagePlan::new(
            "Disclosure",
            vec![
                (1, FieldPlan::Nested(profile)),
                (2, FieldPlan::Nested(profile)),
                (3, FieldPlan::Nested(entry)),
            ],
        ),
    );
    plans
}

#[test]
fn clears_exactly_the_minimized_categories() {
    let plans = plans();
    let bytes = profile().encode_to_vec();
    let (out, done) = minimize(&bytes, &plans, 1, (1 << EMAIL) | (1 << PHONE)).unwrap();
    let got = Profile::decode(&*out).unwrap();
    assert_eq!(
        got,
        Profile {
            email: String::new(),
            phone: String::new(),
            ..profile()
        }
    );
    assert_eq!(
        done,
        Minimized {
            cleared: 2,
            unknown: 0
        }
    );
}

#[test]
fn a_message_that_needs_no_change_is_not_copied() {
    let plans = plans();
    let bytes = profile().encode_to_vec();
    let (out, done) = minimize(&bytes, &plans, 1, 0).unwrap();
    assert!(matches!(out, Cow::Borrowed(_)));
    assert_eq!(&*out, &bytes[..]);
    assert_eq!(done, Minimized::default());
}

#[test]
fn nested_repeated_and_map_fields_are_rewritten_with_their_lengths() {
    let plans = plans();
    let disclosure = Disclosure {
        profile: Some(profile()),
        others: vec![profile(), Profile::default(), profile()],
        notes: [("a".to_owned(), "b".to_owned())].into(),
    };
    let bytes = disclosure.encode_to_vec();
    let (out, done) = minimize(&bytes, &plans, 0, 1 << ADDRESS).unwrap();
    let got = Disclosure::decode(&*out).unwrap();
    let cleared = Profile {
        address: String::new(),
        ..profile()
    };
    assert_eq!(got.profile, Some(cleared.clone()));
    assert_eq!(
        got.others,
        vec![cleared.clone(), Profile::default(), cleared]
    );
    assert_eq!(got.notes, disclosure.notes);
    assert_eq!(done.cleared, 3);
}

#[test]
fn fields_the_descriptors_do_not_know_are_dropped_and_counted() {
    let plans = plans();
    let newer = ProfileV2 {
        customer_id: "cust-1".into(),
        name: "Hanako Yamada".into(),
        birthday: "1990-01-01".into(),
    };
    let bytes = newer.encode_to_vec();
    let (out, done) = minimize(&bytes, &plans, 1, 0).unwrap();
    let got = ProfileV2::decode(&*out).unwrap();
    assert_eq!(got.birthday, "");
    assert_eq!(got.name, "Hanako Yamada");
    assert_eq!(
        done,
        Minimized {
            cleared: 0,
            unknown: 1
        }
    );
}

#[test]
fn a_nested_field_with_another_wire_type_is_dropped_as_unclassified() {
    let plans = plans();
    // Field 1 of Disclosure should be a message; here it is a varint.
    let bytes = [0x08, 0x01];
    let (out, done) = minimize(&bytes, &plans, 0, 0).unwrap();
    assert!(out.is_empty());
    assert_eq!(done.unknown, 1);
}

#[test]
fn malformed_responses_are_errors() {
    let plans = plans();
    let mut bytes = profile().encode_to_vec();
    bytes.truncate(bytes.len() - 3);
    assert_eq!(
        minimize(&bytes, &plans, 1, 0).map(|_| ()),
        Err(WireError::Truncated)
    );
}

#[test]
fn subjects_are_read_at_their_path_in_every_occurrence() {
    let disclosure = Disclosure {
        profile: Some(profile()),
        others: vec![
            Profile {
                customer_id: "cust-2".into(),
                ..Profile::default()
            },
            Profile {
                customer_id: "cust-3".into(),
                ..Profile::default()
            },
        ],
        notes: Default::default(),
    };
    let bytes = disclosure.encode_to_vec();
    assert_eq!(
        subjects(&bytes, &SubjectPath(vec![2, 1])).unwrap(),
        ["cust-2", "cust-3"]
    );
    assert_eq!(
        subjects(&bytes, &SubjectPath(vec![1, 1])).unwrap(),
        ["cust-1"]
    );
    assert_eq!(
        subjects(&profile().encode_to_vec(), &SubjectPath(vec![1])).unwrap(),
        ["cust-1"]
    );
    // Absent: none. Not text: an error.
    assert!(
        subjects(&Profile::default().encode_to_vec(), &SubjectPath(vec![1]))
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        subjects(&[0x0a, 0x01, 0xff], &SubjectPath(vec![1])),
        Err(WireError::NotText)
    );
}

#[test]
fn deep_nesting_is_refused() {
    // A self-nesting message 100 levels deep.
    let mut plans = Plans::default();
    let id = plans.push(MessagePlan::default());
    plans.set(
        id,
        MessagePlan::new("Deep", vec![(1, FieldPlan::Nested(id))]),
    );
    let mut bytes = Vec::new();
    for _ in 0..100 {
        let mut outer = Vec::new();
        wire::put_len_field(&mut outer, 1, &bytes);
        bytes = outer;
    }
    assert_eq!(
        minimize(&bytes, &plans, id, 0).map(|_| ()),
        Err(WireError::TooDeep(MAX_DEPTH))
    );
}

#[test]
fn a_write_sets_the_categories_of_the_fields_it_carries_nested_ones_included() {
    let plans = plans();
    let only_email = Profile {
        customer_id: "cust-1".into(),
        email: "new@example.jp".into(),
        ..Profile::default()
    };
    let bytes = only_email.encode_to_vec();
    assert_eq!(categories_set(&bytes, &plans, 1).unwrap(), 1 << EMAIL);
    let nested = Disclosure {
        others: vec![
            Profile {
                phone: "+81".into(),
                ..Profile::default()
            },
            only_email,
        ],
        ..Disclosure::default()
    };
    let bytes = nested.encode_to_vec();
    assert_eq!(
        categories_set(&bytes, &plans, 0).unwrap(),
        (1 << EMAIL) | (1 << PHONE)
    );
    // Nothing set: an empty message, or one with only unclassified fields.
    assert_eq!(categories_set(&[], &plans, 1).unwrap(), 0);
    let unknown = ProfileV2 {
        birthday: "1990-01-01".into(),
        ..ProfileV2::default()
    };
    assert_eq!(
        categories_set(&unknown.encode_to_vec(), &plans, 1).unwrap(),
        0
    );
}
