//! Minimum necessary: a study may not train on a direct identifier.
//!
//! Before a site trains on a study's columns, every column the study reads (its features and
//! its label) is checked against the HIPAA Safe Harbor kinds of direct identifier (45 CFR
//! 164.514(b)(2)): names, geographic subdivisions smaller than a state (street address, city,
//! county, ZIP code, geocodes), dates tied to a person (birth, admission, discharge, death),
//! telephone and fax numbers, email addresses, social security numbers, medical record,
//! health plan, account and certificate or licence numbers, vehicle and device identifiers,
//! URLs, IP addresses, biometric identifiers, photographs, and any other unique identifying
//! number.
//!
//! Two checks, both heuristics that err towards refusing:
//!
//! - **By name**, before the file is read: the column name is split into lower-case words
//!   (`patientDOB`, `Patient DOB` and `patient_dob` all give `patient`, `dob`) and matched
//!   against word lists and word pairs. Short words only match as whole words, so
//!   `mean_radius` is not a name, `thyroid` is not an id and `ip_visits` is not an IP address.
//! - **By value**, while the file is read: non-numeric cells are refused by the loader
//!   anyway, so what is left to catch is identifiers stored as numbers. A column is refused
//!   when at least [`MOST_VALUES`] of its values have one identifier's shape: 9-digit numbers
//!   with a valid social security number structure, 10-digit North American telephone numbers
//!   (or 11 with a leading 1), 5-digit ZIP codes, whole numbers that read as calendar dates
//!   (`yyyymmdd`, `mmddyyyy`, `ddmmyyyy`) or as Unix timestamps; or when every value (at least
//!   [`MIN_VALUES_FOR_UNIQUE`] of them) is a distinct whole number of 7 or more digits, the
//!   shape of a record or account number. The check reads the cell as written, so leading
//!   zeros (`02139`) count, and keeps only counts.
//!
//! A column the site's own config lists in `allow_identifier_columns` for the study passes;
//! the check still runs on it and the outcome says what it looked like, for the audit log.
//!
//! Nothing here ever quotes a cell: messages and [`ColumnCheck::details`] name columns,
//! identifier kinds and counts only.

use std::collections::{BTreeSet, HashSet};

use serde::Serialize;

use crate::data::ColumnSelection;

/// Share of a column's values that must have one identifier's shape for the column to be
/// refused by its values.
pub const MOST_VALUES: f64 = 0.8;

/// Fewest values for the "every value a distinct long number" test; below this, distinct
/// values say little.
pub const MIN_VALUES_FOR_UNIQUE: u64 = 20;

/// Most distinct values remembered per column for the uniqueness test (bounds memory; a
/// column still unique at this size is taken as unique).
const MAX_TRACKED_DISTINCT: usize = 1_000_000;

/// A HIPAA Safe Harbor kind of direct identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentifierKind {
    Name,
    SocialSecurityNumber,
    MedicalRecordNumber,
    HealthPlanNumber,
    AccountNumber,
    CertificateOrLicenseNumber,
    VehicleIdentifier,
    DeviceIdentifier,
    IpAddress,
    Url,
    EmailAddress,
    FaxNumber,
    PhoneNumber,
    ZipCode,
    /// Street address, city, county, geocode: geography below the state level.
    Address,
    /// A date (or time) tied to a person: birth, admission, discharge, death, a visit.
    PersonalDate,
    BiometricIdentifier,
    Photograph,
    /// Any other unique identifying number or code.
    OtherUniqueIdentifier,
}

impl IdentifierKind {
    /// Stable machine name (as in JSON).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Name => "name",
            Self::SocialSecurityNumber => "social_security_number",
            Self::MedicalRecordNumber => "medical_record_number",
            Self::HealthPlanNumber => "health_plan_number",
            Self::AccountNumber => "account_number",
            Self::CertificateOrLicenseNumber => "certificate_or_license_number",
            Self::VehicleIdentifier => "vehicle_identifier",
            Self::DeviceIdentifier => "device_identifier",
            Self::IpAddress => "ip_address",
            Self::Url => "url",
            Self::EmailAddress => "email_address",
            Self::FaxNumber => "fax_number",
            Self::PhoneNumber => "phone_number",
            Self::ZipCode => "zip_code",
            Self::Address => "address",
            Self::PersonalDate => "personal_date",
            Self::BiometricIdentifier => "biometric_identifier",
            Self::Photograph => "photograph",
            Self::OtherUniqueIdentifier => "other_unique_identifier",
        }
    }

    /// In words, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Name => "a person's name",
            Self::SocialSecurityNumber => "a social security number",
            Self::MedicalRecordNumber => "a medical record or patient number",
            Self::HealthPlanNumber => "a health plan beneficiary number",
            Self::AccountNumber => "an account number",
            Self::CertificateOrLicenseNumber => "a certificate or licence number",
            Self::VehicleIdentifier => "a vehicle identifier or licence plate",
            Self::DeviceIdentifier => "a device identifier or serial number",
            Self::IpAddress => "an IP address",
            Self::Url => "a URL",
            Self::EmailAddress => "an email address",
            Self::FaxNumber => "a fax number",
            Self::PhoneNumber => "a telephone number",
            Self::ZipCode => "a ZIP code",
            Self::Address => "a street address or other place below state level",
            Self::PersonalDate => "a date tied to a person (birth, admission, discharge, death)",
            Self::BiometricIdentifier => "a biometric identifier",
            Self::Photograph => "a photograph",
            Self::OtherUniqueIdentifier => "a unique identifying number or code",
        }
    }
}

impl std::fmt::Display for IdentifierKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

/// The shape of value that made a column look like an identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueShape {
    SsnLike,
    PhoneLike,
    ZipLike,
    DateLike,
    UniqueLongNumbers,
}

impl ValueShape {
    pub fn kind(self) -> IdentifierKind {
        match self {
            Self::SsnLike => IdentifierKind::SocialSecurityNumber,
            Self::PhoneLike => IdentifierKind::PhoneNumber,
            Self::ZipLike => IdentifierKind::ZipCode,
            Self::DateLike => IdentifierKind::PersonalDate,
            Self::UniqueLongNumbers => IdentifierKind::OtherUniqueIdentifier,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::SsnLike => "most values are 9-digit numbers shaped like social security numbers",
            Self::PhoneLike => "most values are 10-digit numbers shaped like telephone numbers",
            Self::ZipLike => "most values are 5-digit numbers shaped like ZIP codes",
            Self::DateLike => {
                "most values are whole numbers that read as calendar dates or timestamps"
            }
            Self::UniqueLongNumbers => {
                "every value is a distinct whole number of 7 or more digits, like a record number"
            }
        }
    }
}

/// Why a column looks like an identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum Evidence {
    /// Its name.
    Name,
    /// Its values: `matching` of the `checked` values have `shape`.
    Values {
        shape: ValueShape,
        matching: u64,
        checked: u64,
    },
}

/// One column that looks like a direct identifier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IdentifierColumn {
    pub column: String,
    pub kind: IdentifierKind,
    #[serde(flatten)]
    pub evidence: Evidence,
}

impl std::fmt::Display for IdentifierColumn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.evidence {
            Evidence::Name => write!(
                f,
                "column {:?} looks like {} by its name",
                self.column, self.kind
            ),
            Evidence::Values { shape, .. } => write!(
                f,
                "column {:?} looks like {} by its values ({})",
                self.column,
                self.kind,
                shape.describe()
            ),
        }
    }
}

/// A study refused because columns it reads look like direct identifiers. The message
/// names the columns and the kinds, never a cell.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{}; the site does not train on direct identifiers (HIPAA Safe Harbor). If a column \
     holds no identifier, the site may list it in allow_identifier_columns for this study \
     in its own config",
    .columns.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
)]
pub struct IdentifierRefusal {
    pub columns: Vec<IdentifierColumn>,
}

/// The outcome of the identifier check of one study's columns, for the audit log.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ColumnCheck {
    /// Every column the study reads: features in the study's order, then the label.
    pub checked: Vec<String>,
    /// Columns among `checked` that the site's config allows.
    pub allowed_by_config: Vec<String>,
    /// What the allowed columns looked like: they passed only because the config allows them.
    pub allowed_matches: Vec<IdentifierColumn>,
    /// Columns that look like identifiers and are not allowed: the study is refused.
    pub refused: Vec<IdentifierColumn>,
    /// Whether the values were checked too (false when the names alone refused the study,
    /// or the file could not be read: no value was looked at).
    pub values_checked: bool,
}

impl ColumnCheck {
    /// Checks the names of the columns `selection` reads; `allowed` is the site's
    /// `allow_identifier_columns` for the study.
    pub fn by_names(selection: &ColumnSelection, allowed: &[String]) -> Self {
        let allow: BTreeSet<&str> = allowed.iter().map(String::as_str).collect();
        let mut check = Self::default();
        for column in selection
            .features
            .iter()
            .chain(std::iter::once(&selection.label))
        {
            check.checked.push(column.clone());
            let is_allowed = allow.contains(column.as_str());
            if is_allowed {
                check.allowed_by_config.push(column.clone());
            }
            if let Some(kind) = identifier_by_name(column) {
                check.record(
                    is_allowed,
                    IdentifierColumn {
                        column: column.clone(),
                        kind,
                        evidence: Evidence::Name,
                    },
                );
            }
        }
        check
    }

    /// Adds the value check's findings (columns already refused or flagged by name are not
    /// reported twice).
    pub fn add_values(&mut self, profiler: &ValueProfiler) {
        self.values_checked = true;
        let mut found = Vec::new();
        for (column, profile) in self.checked.iter().zip(&profiler.profiles) {
            let flagged = self
                .refused
                .iter()
                .chain(&self.allowed_matches)
                .any(|c| &c.column == column);
            if flagged {
                continue;
            }
            if let Some((shape, matching)) = profile.verdict() {
                let allowed = self.allowed_by_config.contains(column);
                found.push((
                    allowed,
                    IdentifierColumn {
                        column: column.clone(),
                        kind: shape.kind(),
                        evidence: Evidence::Values {
                            shape,
                            matching,
                            checked: profile.checked,
                        },
                    },
                ));
            }
        }
        for (allowed, column) in found {
            self.record(allowed, column);
        }
    }

    fn record(&mut self, allowed: bool, found: IdentifierColumn) {
        if allowed {
            self.allowed_matches.push(found);
        } else {
            self.refused.push(found);
        }
    }

    /// True when no column was refused.
    pub fn passed(&self) -> bool {
        self.refused.is_empty()
    }

    /// The refusal, if any column was refused.
    pub fn refusal(&self) -> Option<IdentifierRefusal> {
        (!self.refused.is_empty()).then(|| IdentifierRefusal {
            columns: self.refused.clone(),
        })
    }

    /// The outcome as JSON for an audit record: column names, kinds and counts, never a
    /// cell value.
    pub fn details(&self) -> serde_json::Value {
        serde_json::json!({
            "outcome": if self.passed() { "passed" } else { "refused" },
            "checked": self.checked,
            "allowed_by_config": self.allowed_by_config,
            "allowed_matches": self.allowed_matches,
            "refused": self.refused,
            "values_checked": self.values_checked,
        })
    }
}

// ---------------------------------------------------------------------------------------
// By name

/// A rule over the words of a normalised column name. Word lists are written as one
/// string of space-separated words.
enum Rule {
    /// One of the words is one of these.
    Word(&'static str),
    /// The name is exactly one word, one of these (short words too ambiguous inside a
    /// longer name: `ip` in `ip_visits` is an inpatient count).
    Only(&'static str),
    /// A word from the first list, followed (not necessarily directly) by one from the second.
    Then(&'static str, &'static str),
    /// The words run together contain one of these (long, unambiguous compounds such as
    /// `dateofbirth`, so `patientDateOfBirth` and `date_of_birth` match alike).
    Joined(&'static str),
}

/// Words that make "X number": `account_no`, `patient_id`.
const NUMBER: &str = "number numbers no num nbr nr id ids identifier code";
const ID: &str = "number no num nbr nr id identifier";
/// Events whose date or time ties to a person.
const PERSON_EVENTS: &str = "birth death admission admit admitted discharge discharged visit \
     surgery procedure appointment encounter service diagnosis dx";

/// Checked in this order; the first matching kind is reported.
#[rustfmt::skip]
const RULES: &[(IdentifierKind, Rule)] = {
    use IdentifierKind::*;
    &[
        (SocialSecurityNumber, Rule::Word("ssn ssns socsec")),
        (SocialSecurityNumber, Rule::Then("social", "security sec")),
        (SocialSecurityNumber, Rule::Joined("socialsecurity socsec")),
        (MedicalRecordNumber, Rule::Word(
            "mrn mrns mrno medrec nhs pid patid ptid patientid patientno subjectid personid empi")),
        (MedicalRecordNumber, Rule::Then(
            "medical med patient patients pt hospital chart record case clinic person subject",
            NUMBER)),
        (MedicalRecordNumber, Rule::Joined("medicalrecord medrecord patientnumber hospitalnumber")),
        (HealthPlanNumber, Rule::Word("beneficiary beneficiaries")),
        (HealthPlanNumber, Rule::Then(
            "plan insurance insurer insured subscriber policy medicaid medicare payer group member",
            ID)),
        (HealthPlanNumber, Rule::Joined("healthplan")),
        (AccountNumber, Rule::Word("acct acctno iban")),
        (AccountNumber, Rule::Then(
            "account billing invoice bank card creditcard debitcard", ID)),
        (AccountNumber, Rule::Joined("accountnumber creditcard")),
        (VehicleIdentifier, Rule::Word("vin vins")),
        (VehicleIdentifier, Rule::Then("vehicle car plate", "number no num id identifier serial")),
        (VehicleIdentifier, Rule::Then("license licence number", "plate plates")),
        (VehicleIdentifier, Rule::Joined("licenseplate licenceplate numberplate")),
        (CertificateOrLicenseNumber, Rule::Word("passport passports")),
        (CertificateOrLicenseNumber, Rule::Then(
            "license licence licensure certificate cert permit dl", ID)),
        (CertificateOrLicenseNumber, Rule::Joined(
            "driverslicense driverlicense driverslicence driverlicence")),
        (DeviceIdentifier, Rule::Word("imei udid meid serialno deviceid")),
        (DeviceIdentifier, Rule::Then(
            "device serial implant pacemaker equipment udi",
            "number no num nbr nr id identifier serial")),
        (DeviceIdentifier, Rule::Then("mac", "address addr")),
        (DeviceIdentifier, Rule::Joined("serialnumber macaddress")),
        (IpAddress, Rule::Word("ipaddress ipaddr ipv ipv4 ipv6")),
        (IpAddress, Rule::Then("ip", "address addr addresses")),
        (IpAddress, Rule::Only("ip")),
        (IpAddress, Rule::Joined("ipaddress")),
        (Url, Rule::Word("url urls uri website webpage homepage weblink")),
        (EmailAddress, Rule::Word("email emails emailaddress mail mailaddress")),
        (EmailAddress, Rule::Then("e", "mail")),
        (FaxNumber, Rule::Word("fax faxes faxno faxnumber telefax")),
        (PhoneNumber, Rule::Word(
            "phone phones telephone tel telno phonenumber phoneno cellphone mobilephone msisdn")),
        (PhoneNumber, Rule::Then("mobile cell contact", "number no phone")),
        (PhoneNumber, Rule::Joined("phonenumber telephone cellphone")),
        (ZipCode, Rule::Word("zip zips zipcode postcode postcodes postal postalcode")),
        (ZipCode, Rule::Joined("zipcode postalcode postcode")),
        (Address, Rule::Word(
            "address addresses addr street streetaddress city county town village precinct \
             geocode geocodes neighborhood neighbourhood latitude longitude geolocation gps \
             residence")),
        (Address, Rule::Then("census", "tract block")),
        (Address, Rule::Only("lat lon lng")),
        (Address, Rule::Joined("streetaddress homeaddress")),
        (PersonalDate, Rule::Word(
            "date dates datetime timestamp timestamps dob dod birthday birthdate dateofbirth \
             deathdate admitdate dischargedate")),
        (PersonalDate, Rule::Then(PERSON_EVENTS, "time datetime timestamp dt")),
        (PersonalDate, Rule::Then("time", PERSON_EVENTS)),
        (PersonalDate, Rule::Joined(
            "dateofbirth birthdate birthday dateofdeath deathdate admissiondate admitdate \
             dischargedate")),
        (BiometricIdentifier, Rule::Word(
            "biometric biometrics fingerprint fingerprints voiceprint voiceprints handprint \
             palmprint faceprint retinascan irisscan")),
        (BiometricIdentifier, Rule::Then(
            "finger voice palm hand face retina retinal iris",
            "print prints scan template signature")),
        (BiometricIdentifier, Rule::Joined("fingerprint voiceprint")),
        (Photograph, Rule::Word(
            "photo photos photograph photographs picture pictures headshot mugshot selfie \
             portrait")),
        (Photograph, Rule::Then("face facial", "image images img photo")),
        (Name, Rule::Word(
            "name names surname surnames forename forenames firstname lastname fullname \
             givenname familyname maidenname middlename nickname fname lname mname initials \
             patientname")),
        (Name, Rule::Joined(
            "firstname lastname surname fullname givenname familyname maidenname middlename \
             forename patientname")),
        (OtherUniqueIdentifier, Rule::Word("id ids identifier identifiers uuid guid uid")),
    ]
};

/// The words of a column name: split at anything not a letter or digit, at lower-to-upper
/// case changes (`patientId`), before the last capital of a run of capitals followed by a
/// lower-case letter (`IPAddress`), and between letters and digits (`zip5`); lower-cased.
pub fn name_words(name: &str) -> Vec<String> {
    let chars: Vec<char> = name.chars().collect();
    let mut words = Vec::new();
    let mut cur = String::new();
    for (i, &c) in chars.iter().enumerate() {
        if !c.is_alphanumeric() {
            if !cur.is_empty() {
                words.push(std::mem::take(&mut cur));
            }
            continue;
        }
        if let Some(&prev) = i.checked_sub(1).and_then(|p| chars.get(p)) {
            let next = chars.get(i + 1).copied();
            let boundary = (prev.is_lowercase() && c.is_uppercase())
                || (prev.is_uppercase()
                    && c.is_uppercase()
                    && next.is_some_and(|n| n.is_lowercase()))
                || (prev.is_alphabetic() && c.is_numeric())
                || (prev.is_numeric() && c.is_alphabetic());
            if boundary && !cur.is_empty() {
                words.push(std::mem::take(&mut cur));
            }
        }
        cur.extend(c.to_lowercase());
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

/// The kind of direct identifier a column's name suggests, if any.
pub fn identifier_by_name(name: &str) -> Option<IdentifierKind> {
    let words = name_words(name);
    if words.is_empty() {
        return None;
    }
    let joined: String = words.concat();
    let has = |list: &str, w: &str| list.split_whitespace().any(|l| l == w);
    RULES.iter().find_map(|(kind, rule)| {
        let hit = match rule {
            Rule::Word(list) => words.iter().any(|w| has(list, w)),
            Rule::Only(list) => words.len() == 1 && has(list, &words[0]),
            Rule::Then(first, second) => words
                .iter()
                .enumerate()
                .any(|(i, w)| has(first, w) && words[i + 1..].iter().any(|v| has(second, v))),
            Rule::Joined(list) => list.split_whitespace().any(|s| joined.contains(s)),
        };
        hit.then_some(*kind)
    })
}

// ---------------------------------------------------------------------------------------
// By value

/// Counts, for one column, how many values have each identifier's shape. Keeps no value,
/// except (bounded) the distinct long whole numbers while the column could still be a
/// column of record numbers.
#[derive(Debug, Clone)]
pub struct ValueProfile {
    checked: u64,
    ssn: u64,
    phone: u64,
    zip: u64,
    date: u64,
    /// Still possibly unique record numbers: every value so far a distinct whole number of
    /// 7+ digits. `None` once not.
    distinct: Option<HashSet<u64>>,
}

impl Default for ValueProfile {
    fn default() -> Self {
        Self {
            checked: 0,
            ssn: 0,
            phone: 0,
            zip: 0,
            date: 0,
            distinct: Some(HashSet::new()),
        }
    }
}

impl ValueProfile {
    /// Takes one cell as written (already known to be a finite number).
    pub fn observe(&mut self, cell: &str) {
        self.checked += 1;
        let Some((v, width)) = whole_number(cell) else {
            self.distinct = None;
            return;
        };
        self.ssn += u64::from(width == 9 && ssn_like(v));
        self.phone += u64::from(phone_like(v, width));
        self.zip += u64::from(width == 5 && v >= 501);
        self.date += u64::from(date_like(v, width));
        if let Some(seen) = &mut self.distinct {
            let repeated = seen.len() < MAX_TRACKED_DISTINCT && !seen.insert(v);
            if width < 7 || repeated {
                self.distinct = None;
            }
        }
    }

    /// Values seen.
    pub fn checked(&self) -> u64 {
        self.checked
    }

    /// The shape most values have, with how many have it; `None` if the column looks like
    /// no identifier.
    pub fn verdict(&self) -> Option<(ValueShape, u64)> {
        if self.checked == 0 {
            return None;
        }
        let most = |n: u64| n > 0 && n as f64 >= MOST_VALUES * self.checked as f64;
        [
            (ValueShape::DateLike, self.date),
            (ValueShape::SsnLike, self.ssn),
            (ValueShape::PhoneLike, self.phone),
            (ValueShape::ZipLike, self.zip),
        ]
        .into_iter()
        .find(|&(_, n)| most(n))
        .or_else(|| {
            (self.distinct.is_some() && self.checked >= MIN_VALUES_FOR_UNIQUE)
                .then_some((ValueShape::UniqueLongNumbers, self.checked))
        })
    }
}

/// Profiles the values of every column a study reads (slot order as in
/// [`crate::data::load_csv_observed`]: features, then the label).
#[derive(Debug, Clone)]
pub struct ValueProfiler {
    profiles: Vec<ValueProfile>,
}

impl ValueProfiler {
    pub fn new(selection: &ColumnSelection) -> Self {
        Self {
            profiles: vec![ValueProfile::default(); selection.features.len() + 1],
        }
    }

    /// The observer to pass to the loader.
    pub fn observe(&mut self, slot: usize, cell: &str) {
        if let Some(p) = self.profiles.get_mut(slot) {
            p.observe(cell);
        }
    }

    pub fn profiles(&self) -> &[ValueProfile] {
        &self.profiles
    }
}

/// The cell as a non-negative whole number with the count of digits written (leading zeros
/// included): `02139` is (2139, 5), `123456789.0` is (123456789, 9), `1.5e3` is (1500, 4).
fn whole_number(cell: &str) -> Option<(u64, usize)> {
    let t = cell.strip_prefix('+').unwrap_or(cell);
    let (int, frac) = match t.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (t, None),
    };
    if !int.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.is_none_or(|f| f.bytes().all(|b| b == b'0'))
    {
        return if int.len() <= 19 {
            int.parse().ok().map(|v| (v, int.len()))
        } else {
            None
        };
    }
    let v: f64 = t.parse().ok()?;
    if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < 1e15 {
        let v = v as u64;
        Some((v, decimal_width(v)))
    } else {
        None
    }
}

fn decimal_width(v: u64) -> usize {
    v.checked_ilog10().map_or(1, |l| l as usize + 1)
}

/// A 9-digit number with the structure of a US social security number: area not 000, 666
/// or 900-999, group not 00, serial not 0000.
fn ssn_like(v: u64) -> bool {
    let (area, group, serial) = (v / 1_000_000, (v / 10_000) % 100, v % 10_000);
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

/// A North American number (NXX NXX XXXX, N = 2-9), optionally with the leading 1.
fn phone_like(v: u64, width: usize) -> bool {
    let nanp = |n: u64| {
        let area = n / 1_000_000_000;
        let exchange = (n / 1_000_000) % 10;
        (2..=9).contains(&area) && (2..=9).contains(&exchange)
    };
    match width {
        10 => nanp(v),
        11 => v / 10_000_000_000 == 1 && nanp(v % 10_000_000_000),
        _ => false,
    }
}

/// `yyyymmdd`, `mmddyyyy` or `ddmmyyyy` (7 digits when the leading zero was lost) with a
/// year 1900-2100, or a Unix timestamp (seconds 2001-2033, or milliseconds 2000-2100).
fn date_like(v: u64, width: usize) -> bool {
    match width {
        8 if valid_date(v / 10_000, (v / 100) % 100, v % 100) => true,
        7 | 8 => {
            let (a, b, year) = (v / 1_000_000, (v / 10_000) % 100, v % 10_000);
            valid_date(year, a, b) || valid_date(year, b, a)
        }
        10 => (1_000_000_000..2_000_000_000).contains(&v),
        13 => (946_684_800_000..4_102_444_800_000).contains(&v),
        _ => false,
    }
}

fn valid_date(year: u64, month: u64, day: u64) -> bool {
    if !(1900..=2100).contains(&year) || !(1..=12).contains(&month) || day == 0 {
        return false;
    }
    let leap = (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400);
    let days = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    day <= days
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::data::{read_csv_observed, LoadOptions};

    fn sel(features: &[&str], label: &str) -> ColumnSelection {
        ColumnSelection {
            features: features.iter().map(|s| s.to_string()).collect(),
            label: label.to_string(),
        }
    }

    /// Loads `text` with the value profiler and returns the full check.
    fn check_csv(text: &str, features: &[&str], label: &str, allowed: &[&str]) -> ColumnCheck {
        let selection = sel(features, label);
        let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
        let mut check = ColumnCheck::by_names(&selection, &allowed);
        let mut profiler = ValueProfiler::new(&selection);
        read_csv_observed(
            text.as_bytes(),
            &selection,
            &LoadOptions::regression(),
            &mut |slot, cell| profiler.observe(slot, cell),
        )
        .unwrap();
        check.add_values(&profiler);
        check
    }

    #[test]
    fn words_of_a_name() {
        assert_eq!(name_words("patientDOB"), ["patient", "dob"]);
        assert_eq!(name_words("Patient DOB"), ["patient", "dob"]);
        assert_eq!(name_words("IPAddress"), ["ip", "address"]);
        assert_eq!(name_words("zip5"), ["zip", "5"]);
        assert_eq!(name_words("mean_radius"), ["mean", "radius"]);
        assert_eq!(name_words("  E-Mail "), ["e", "mail"]);
        assert!(name_words("__").is_empty());
    }

    #[test]
    #[rustfmt::skip]
    fn every_kind_is_detected_by_name() {
        use IdentifierKind::*;
        // Names separated by commas.
        let cases: &[(IdentifierKind, &str)] = &[
            (Name, "name, first_name, LastName, surname, patient_name, Patient Full Name, \
                    initials, maidenName"),
            (SocialSecurityNumber, "ssn, patient_SSN, social_security_number, \
                    SocialSecurityNo, soc_sec"),
            (MedicalRecordNumber, "mrn, MRN, medical_record_number, MedicalRecordNo, \
                    patient_id, patientId, PatientID, hospital_number, chart_no, record_id, \
                    nhs_number"),
            (HealthPlanNumber, "health_plan_number, HealthPlanID, insurance_id, \
                    medicaid_number, member_id, policy_no, beneficiary"),
            (AccountNumber, "account_number, acct, AccountNo, billing_account_id, \
                    credit_card_number"),
            (CertificateOrLicenseNumber, "license_number, licence_no, drivers_license, \
                    DriverLicense, certificate_number, passport"),
            (VehicleIdentifier, "vin, vehicle_id, license_plate, LicensePlateNumber, \
                    number_plate"),
            (DeviceIdentifier, "device_id, DeviceSerial, serial_number, pacemaker_serial, \
                    imei, mac_address, implant_udi_number"),
            (IpAddress, "ip, ip_address, IPAddress, ipv4, client_ip_addr"),
            (Url, "url, homepage, website, profile_url"),
            (EmailAddress, "email, E-Mail, emailAddress, contact_email"),
            (FaxNumber, "fax, fax_number, FaxNo"),
            (PhoneNumber, "phone, telephone, PhoneNumber, home_phone, mobile_number, tel, \
                    cellphone"),
            (ZipCode, "zip, zip_code, ZipCode, zip5, postcode, postal_code, home_zip"),
            (Address, "address, street, home_address, StreetAddress, city, county, latitude, \
                    lon, census_tract"),
            (PersonalDate, "dob, DOB, date_of_birth, DateOfBirth, birthdate, birth_date, \
                    admission_date, AdmitDate, discharge_date, date_of_death, death_date, \
                    visit_date, discharge_time, time_of_death, timestamp"),
            (BiometricIdentifier, "fingerprint, voice_print, retina_scan, iris_template, \
                    biometric_hash"),
            (Photograph, "photo, photograph, face_image, FacialPhoto, picture"),
            (OtherUniqueIdentifier, "id, ID, encounter_id, uuid, guid, study_identifier"),
        ];
        for (kind, names) in cases {
            for name in names.split(',').map(str::trim) {
                assert_eq!(identifier_by_name(name), Some(*kind), "{name}");
            }
        }
    }

    #[test]
    fn ordinary_clinical_names_pass() {
        // The bundled data sets' own columns are checked in `bundled_data_passes`.
        let names = "mean_radius radius_mean fractal_dimension age sex gender bmi bp \
            systolic_bp glucose hba1c HbA1c thyroid lipid_panel fluid_balance covid_19 \
            uric_acid birth_weight birth_year gestational_age death mortality \
            days_since_admission length_of_stay readmitted cell_size cell_count \
            iris_petal_length retinal_thickness image_intensity insurance_type medicaid \
            ip_visits state country year diagnosis_code icd10 number_of_visits visits smoker \
            renamed_score idc_grade photometric_ratio malignant progression s1_tc s6_glu \
            deceased ldl hdl";
        for name in names.split_whitespace() {
            assert_eq!(identifier_by_name(name), None, "{name}");
        }
    }

    #[test]
    fn bundled_data_passes() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("csv") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let header: Vec<&str> = text.lines().next().unwrap().split(',').collect();
            let (label, features) = header.split_last().unwrap();
            let check = check_csv(&text, features, label, &[]);
            assert!(check.passed(), "{}: {:?}", path.display(), check.refused);
            assert!(check.values_checked && check.allowed_matches.is_empty());
            assert_eq!(check.checked.len(), header.len());
            seen += 1;
        }
        assert!(
            seen >= 2,
            "expected the bundled CSV files in {}",
            dir.display()
        );
    }

    /// `n` rows: `feature` from `cell(i)`, a plain feature `x`, label `y`.
    fn table(n: usize, cell: impl Fn(usize) -> String) -> String {
        let mut t = String::from("x,feature,y\n");
        for i in 0..n {
            t.push_str(&format!("{}.5,{},{}\n", i, cell(i), i % 2));
        }
        t
    }

    fn values_verdict(text: &str) -> Option<IdentifierColumn> {
        let check = check_csv(text, &["x", "feature"], "y", &[]);
        assert!(check.refused.iter().all(|c| c.column == "feature"));
        check.refused.into_iter().next()
    }

    fn kind_by_values(n: usize, cell: impl Fn(usize) -> String) -> Option<IdentifierKind> {
        values_verdict(&table(n, cell)).map(|c| c.kind)
    }

    #[test]
    fn identifiers_stored_as_numbers_are_detected_by_value() {
        use IdentifierKind::*;
        // SSN-shaped: 9 digits, valid area/group/serial; leading zeros as written count.
        assert_eq!(
            kind_by_values(50, |i| format!("{}", 123_456_789 + i * 1_010_101)),
            Some(SocialSecurityNumber)
        );
        assert_eq!(
            kind_by_values(10, |i| format!("0{}", 12_345_678 + i)),
            Some(SocialSecurityNumber)
        );
        // North American phone numbers, with and without the leading 1.
        assert_eq!(
            kind_by_values(30, |i| format!("{}", 6_175_550_100u64 + i as u64)),
            Some(PhoneNumber)
        );
        assert_eq!(
            kind_by_values(30, |i| format!("1{}", 2_125_550_100u64 + i as u64)),
            Some(PhoneNumber)
        );
        // ZIP codes, leading zero kept by the check although the number loses it.
        assert_eq!(
            kind_by_values(40, |i| format!("0{}", 2139 + i)),
            Some(ZipCode)
        );
        assert_eq!(
            kind_by_values(40, |i| format!("{}", 90_210 + i)),
            Some(ZipCode)
        );
        // Dates of birth as yyyymmdd, as mmddyyyy with the leading zero lost, timestamps.
        assert_eq!(
            kind_by_values(28, |i| format!("1985{:02}{:02}", i % 12 + 1, i + 1)),
            Some(PersonalDate)
        );
        assert_eq!(
            kind_by_values(28, |i| format!("{}{:02}1972", i % 9 + 1, i + 1)),
            Some(PersonalDate)
        );
        assert_eq!(
            kind_by_values(28, |i| format!("{}", 1_600_000_000 + i * 86_400)),
            Some(PersonalDate)
        );
        assert_eq!(
            kind_by_values(28, |i| format!("{}", 1_600_000_000_000u64 + i as u64)),
            Some(PersonalDate)
        );
        // Written as floats or with an exponent: still the same number.
        assert_eq!(
            kind_by_values(20, |i| format!("{}.0", 90_210 + i)),
            Some(ZipCode)
        );
        assert_eq!(
            kind_by_values(20, |i| format!("9.{:04}e4", 210 + i)),
            Some(ZipCode)
        );
        // Distinct long numbers: record numbers.
        assert_eq!(
            kind_by_values(25, |i| format!("{}", 4_000_000 + i * 37)),
            Some(OtherUniqueIdentifier)
        );
    }

    #[test]
    fn thresholds_and_ordinary_values() {
        // 80% is enough; below it is not.
        let mostly = |good: usize| {
            kind_by_values(10, move |i| {
                if i < good {
                    format!("{}", 10_001 + i)
                } else {
                    format!("{}.25", i)
                }
            })
        };
        assert_eq!(mostly(8), Some(IdentifierKind::ZipCode));
        assert_eq!(mostly(7), None);
        // Ordinary measurements: decimals, small integers, 4-digit areas, repeated long values.
        assert_eq!(
            kind_by_values(50, |i| format!("{}.{}", 10 + i, i % 7)),
            None
        );
        assert_eq!(kind_by_values(50, |i| format!("{}", 1001 + i * 30)), None);
        assert_eq!(kind_by_values(50, |i| format!("{}", i % 3)), None);
        assert_eq!(
            kind_by_values(50, |i| format!("{}", 4_500_000 + (i % 10) * 1000)),
            None
        );
        // Distinct long numbers, but too few to say.
        assert_eq!(kind_by_values(5, |i| format!("{}", 4_000_000 + i)), None);
        // 9 digits that cannot be SSNs (area 9xx), 10 digits that cannot be NANP numbers.
        assert_eq!(
            kind_by_values(30, |i| format!("{}", 912_345_678 + i * 1000 * (i % 2))),
            None
        );
        assert_eq!(
            kind_by_values(30, |i| format!("{}", 2_011_550_100u64 + (i % 2) as u64)),
            None
        );
        // 8 digits that are not dates.
        assert_eq!(
            kind_by_values(30, |i| format!("{}", 55_554_400 + (i % 3))),
            None
        );
    }

    #[test]
    fn allowed_columns_pass_and_say_what_they_looked_like() {
        let text = "zip3,visit_count,home_zip,y\n021,1,02139,0\n100,2,10001,1\n";
        let check = check_csv(
            text,
            &["zip3", "visit_count", "home_zip"],
            "y",
            &["zip3", "home_zip"],
        );
        assert!(check.passed(), "{:?}", check.refused);
        assert_eq!(check.allowed_by_config, ["zip3", "home_zip"]);
        let kinds: Vec<_> = check
            .allowed_matches
            .iter()
            .map(|c| (c.column.as_str(), c.kind))
            .collect();
        assert_eq!(
            kinds,
            [
                ("zip3", IdentifierKind::ZipCode),
                ("home_zip", IdentifierKind::ZipCode)
            ]
        );
        // Allowed by value too.
        let text = table(20, |i| format!("{}", 90_210 + i));
        let check = check_csv(&text, &["x", "feature"], "y", &["feature"]);
        assert!(check.passed());
        assert!(matches!(
            check.allowed_matches[0].evidence,
            Evidence::Values {
                shape: ValueShape::ZipLike,
                matching: 20,
                checked: 20
            }
        ));
        // Allowing one column does not allow another.
        let check = check_csv("ssn,dob,y\n1,2,0\n", &["ssn", "dob"], "y", &["dob"]);
        assert_eq!(check.refused.len(), 1);
        assert_eq!(check.refused[0].column, "ssn");
        assert_eq!(check.allowed_matches[0].kind, IdentifierKind::PersonalDate);
    }

    #[test]
    fn messages_and_details_name_columns_never_values() {
        let ssns: Vec<String> = (0..30)
            .map(|i| format!("{}", 219_099_999 - i * 11))
            .collect();
        let mut text = String::from("a,patient_name,tax,y\n");
        for (i, s) in ssns.iter().enumerate() {
            text.push_str(&format!("{i}.5,{i},{s},{}\n", i % 2));
        }
        let check = check_csv(&text, &["a", "patient_name", "tax"], "y", &[]);
        assert!(!check.passed());
        let refusal = check.refusal().unwrap();
        let msg = refusal.to_string();
        let details = check.details().to_string();
        for out in [&msg, &details] {
            assert!(out.contains("patient_name") && out.contains("tax"), "{out}");
            for s in &ssns {
                assert!(!out.contains(s.as_str()), "leaks a cell: {out}");
            }
        }
        assert!(msg.contains("social security"), "{msg}");
        assert!(msg.contains("allow_identifier_columns"), "{msg}");
        let v = check.details();
        assert_eq!(v["outcome"], "refused");
        assert_eq!(v["refused"][0]["column"], "patient_name");
        assert_eq!(v["refused"][0]["kind"], "name");
        assert_eq!(v["refused"][0]["by"], "name");
        assert_eq!(v["refused"][1]["kind"], "social_security_number");
        assert_eq!(v["refused"][1]["by"], "values");
        assert_eq!(v["refused"][1]["matching"], 30);
        assert_eq!(v["values_checked"], true);
    }

    #[test]
    fn label_is_checked_too() {
        let check = ColumnCheck::by_names(&sel(&["a"], "date_of_death"), &[]);
        assert_eq!(check.refused[0].kind, IdentifierKind::PersonalDate);
        assert!(!check.values_checked);
        assert_eq!(check.checked, ["a", "date_of_death"]);
    }

    #[test]
    fn whole_numbers_as_written() {
        assert_eq!(whole_number("02139"), Some((2139, 5)));
        assert_eq!(whole_number("+123.000"), Some((123, 3)));
        assert_eq!(whole_number("1.5e3"), Some((1500, 4)));
        assert_eq!(whole_number("0"), Some((0, 1)));
        assert_eq!(whole_number("12.5"), None);
        assert_eq!(whole_number("-5"), None);
        assert_eq!(whole_number("1e300"), None);
        assert!(valid_date(2000, 2, 29) && !valid_date(1900, 2, 29) && !valid_date(2023, 4, 31));
    }
}
