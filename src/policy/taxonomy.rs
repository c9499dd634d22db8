//! `taxonomy.toml`: the purposes, categories and callers that `policy.csv` speaks of, and the
//! limits that hold whatever it grants (secrecy of communications, de-identification, the
//! subject's requests). Ids keep their position so that problems can name a line.

use serde::Deserialize;
use serde_spanned::Spanned;

pub const TAXONOMY_FILE: &str = "taxonomy.toml";

/// An id (or other string) as written, with its byte span in the file.
pub type Sp = Spanned<String>;

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Taxonomy {
    #[serde(default, rename = "purpose")]
    pub purposes: Vec<PurposeEntry>,
    #[serde(default, rename = "category")]
    pub categories: Vec<CategoryEntry>,
    #[serde(default, rename = "caller")]
    pub callers: Vec<CallerEntry>,
    pub secrecy: SecrecyLimit,
    pub deidentification: DeidentificationLimit,
    pub suspension: SuspensionRules,
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PurposeEntry {
    #[schemars(with = "String")]
    pub id: Sp,
    pub clause: String,
    #[serde(default)]
    pub description: String,
    /// The description in Japanese, for the data subject's disclosure report (`--lang ja`);
    /// the report falls back to `description` without it.
    #[serde(default)]
    pub description_ja: String,
    /// The data subject's consent is needed for this purpose and its children.
    #[serde(default)]
    pub consent: bool,
    /// A call for this purpose (and its children) must name its data subject.
    #[serde(default)]
    pub subject: bool,
    /// Data used for this purpose (and its children) goes to a company of this kind.
    #[serde(default)]
    #[schemars(with = "Option<CallerKind>")]
    pub recipient: Option<Spanned<CallerKind>>,
    /// Who is responsible for protecting and managing the data used for this purpose (and its
    /// children): §2(d) names the CISO for joint use.
    #[serde(default)]
    pub manager: Option<Manager>,
}

/// The person responsible for protecting and managing personal data used for a purpose, and the
/// clause that names them.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Manager {
    pub name: String,
    pub clause: String,
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CategoryEntry {
    #[schemars(with = "String")]
    pub id: Sp,
    pub clause: String,
    #[serde(default)]
    pub description: String,
    /// The description in Japanese, for the data subject's disclosure report (`--lang ja`);
    /// the report falls back to `description` without it.
    #[serde(default)]
    pub description_ja: String,
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CallerEntry {
    #[schemars(with = "String")]
    pub id: Sp,
    #[schemars(with = "String")]
    pub role: Sp,
    pub kind: CallerKind,
    #[schemars(with = "Vec<String>")]
    pub purposes: Vec<Sp>,
    pub clause: String,
    #[serde(default)]
    pub description: String,
    /// The description in Japanese, for the data subject's disclosure report (`--lang ja`);
    /// the report falls back to `description` without it.
    #[serde(default)]
    pub description_ja: String,
}

/// Where a caller sits relative to the company that holds the data.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum CallerKind {
    /// One of the company's own services.
    Internal,
    /// A joint user of §2 (SoftBank, BBSakura Networks).
    JointUser,
    /// A third party of §3 (ISP partners, NTT East, NTT West).
    ThirdParty,
}

impl CallerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Internal => "internal",
            Self::JointUser => "joint_user",
            Self::ThirdParty => "third_party",
        }
    }
}

/// §5: which purposes may use communications data, and which never may.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecrecyLimit {
    pub clause: String,
    #[schemars(with = "Vec<String>")]
    pub categories: Vec<Sp>,
    #[schemars(with = "Vec<String>")]
    pub purposes: Vec<Sp>,
    #[schemars(with = "Vec<String>")]
    pub never_purposes: Vec<Sp>,
    pub never_recipients: Vec<CallerKind>,
}

/// §1(3), §4: purposes that get de-identified data only.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeidentificationLimit {
    pub clause: String,
    #[schemars(with = "Vec<String>")]
    pub purposes: Vec<Sp>,
    #[schemars(with = "Vec<String>")]
    pub categories: Vec<Sp>,
}

/// §7: what the subject's suspension and deletion requests stop.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SuspensionRules {
    pub clause: String,
    #[schemars(with = "Vec<String>")]
    pub use_exempt_purposes: Vec<Sp>,
    #[schemars(with = "Vec<String>")]
    pub provision_purposes: Vec<Sp>,
    /// What a deletion request does not stop: carrying out the subject's requests and what the
    /// law requires to be kept. Required: a policy must say what a deletion request leaves.
    #[schemars(with = "Vec<String>")]
    pub deletion_exempt_purposes: Vec<Sp>,
}

/// The JSON Schema of `taxonomy.toml` (for editors; `pdgate policy schema taxonomy`).
pub fn schema() -> schemars::Schema {
    schemars::schema_for!(Taxonomy)
}
