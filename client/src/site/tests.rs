#![allow(clippy::unwrap_used)]
use super::*;
use crate::identifiers::IdentifierKind;
use fedpriv_common::config::DataSpec;
use fedpriv_common::dp::accountant::AccountantKind;
use fedpriv_common::dp::SgmEvent;
use fedpriv_common::model::Architecture;
use fedpriv_common::wire::{Dtype, TensorHeader};

/// A site config with one source (`patients.csv`, 200 declared records) and study `s`
/// pinned as `unit`, with `extra` lines added to the study's table.
fn config(dir: &std::path::Path, unit: &str, extra: &str) -> SiteConfig {
    let record_limits = if unit == "record" {
        "max_sample_rate = 0.2\nmax_steps_per_round = 10\n"
    } else {
        ""
    };
    let toml = format!(
        "[site]\nname = \"st-marys\"\nstate_dir = \"state\"\n\n\
         [coordinator]\naddress = \"127.0.0.1:7443\"\nserver_name = \"localhost\"\n\n\
         [tls]\nca = \"ca.pem\"\ncert = \"site.pem\"\nkey = \"site.key\"\n\n\
         [sources.wards]\npath = \"patients.csv\"\nrecords = 200\ndelta = 1e-5\nepsilon_cap = 50.0\n\n\
         [studies.s]\nsource = \"wards\"\nepsilon_cap = 20.0\nunit = \"{unit}\"\ntask = \"binary\"\n\
         label = \"y\"\nfeatures = [\"age\", \"lab_value\"]\nclip_norm = 1.0\nmin_noise_multiplier = 1.0\n\
         max_delta = 1e-5\n{record_limits}{extra}\n"
    );
    SiteConfig::from_toml(&toml, dir).unwrap()
}

fn announcement(unit: PrivacyUnit, features: &[&str]) -> StudyAnnouncement {
    let local = match unit {
        PrivacyUnit::Record => LocalPlan::DpSgd {
            steps: 7,
            expected_batch: 20.0,
            learning_rate: 0.5,
        },
        PrivacyUnit::Site => LocalPlan::Sgd {
            epochs: 1,
            batch_size: 16,
            learning_rate: 0.5,
        },
    };
    StudyAnnouncement {
        instance: "run-1".into(),
        study: "s".into(),
        model: Architecture::LogisticRegression,
        data: DataSpec {
            task: TaskKind::Binary,
            label: "y".into(),
            classes: 0,
            class_labels: Vec::new(),
            features: features.iter().map(|f| f.to_string()).collect(),
            ranges: vec![[0.0, 100_000.0]; features.len()],
            label_range: None,
            fills: vec![None; features.len()],
            categorical: Vec::new(),
            image: None,
        },
        unit,
        placement: Placement::Local,
        delta: 1e-6,
        clip_norm: 1.0,
        noise_multiplier: 2.0,
        local,
        evaluation: None,
    }
}

fn write_plain_data(dir: &std::path::Path) {
    let mut text = String::from("age,lab_value,y\n");
    for i in 0..200 {
        text.push_str(&format!("{},{}.5,{}\n", 30 + i % 50, i % 7, i % 2));
    }
    std::fs::write(dir.join("patients.csv"), text).unwrap();
}

fn task_for(study: &PreparedStudy, round: u64) -> Task {
    let ann = &study.announcement;
    Task {
        study: ann.study.clone(),
        round,
        header: TensorHeader::for_spec(&study.spec, Dtype::F32),
        cost: price(study).unwrap().0,
        clip_norm: ann.clip_norm,
        noise_multiplier: ann.noise_multiplier,
        unit: ann.unit,
        placement: ann.placement,
        local: ann.local.clone(),
        delta: ann.delta,
        evaluation: ann
            .evaluation
            .filter(|e| e.is_due(round))
            .map(|e| e.event()),
    }
}

struct Site {
    _dir: tempfile::TempDir,
    cfg: SiteConfig,
    loaded: BTreeMap<String, StudyLoad>,
    ledger: SiteLedger,
    noise: NoiseSource,
}

fn site(unit: &str, extra: &str) -> Site {
    let dir = tempfile::tempdir().unwrap();
    write_plain_data(dir.path());
    let cfg = config(dir.path(), unit, extra);
    let loaded = load_site_data(&cfg);
    let ledger = SiteLedger::open(dir.path().join("ledger.db")).unwrap();
    Site {
        _dir: dir,
        cfg,
        loaded,
        ledger,
        noise: NoiseSource::from_os().unwrap(),
    }
}

impl Site {
    fn prepare(&self, ann: &StudyAnnouncement) -> Result<PreparedStudy, Refusal> {
        let pinned = self.ledger.pinned_terms(&ann.study).unwrap();
        // A fixed split seed (the daemon keeps one per study in its ledger).
        let seed = ann.evaluation.map(|_| 99);
        prepare_study(&self.cfg, &self.loaded, pinned.as_ref(), ann, seed)
    }

    fn run(&mut self, study: &PreparedStudy, task: &Task) -> Result<Released, Refusal> {
        let global = vec![0.0f32; study.spec.num_values()];
        self.run_with(study, task, global)
    }

    fn run_with(
        &mut self,
        study: &PreparedStudy,
        task: &Task,
        global: Vec<f32>,
    ) -> Result<Released, Refusal> {
        run_task(
            &self.cfg,
            study,
            &mut self.ledger,
            &mut self.noise,
            task,
            global,
            "coordinator",
        )
    }
}

#[test]
fn the_ledger_pays_exactly_the_dp_sgd_steps_taken_and_refuses_replays_and_underpricing() {
    let mut s = site("record", "");
    let ann = announcement(PrivacyUnit::Record, &["age"]);
    let study = s.prepare(&ann).unwrap();
    let mut task = task_for(&study, 1);
    let released = s.run(&study, &task).unwrap();
    assert_eq!(released.update.len(), study.spec.num_values());
    assert!(released.update.iter().any(|v| *v != 0.0));
    assert!(released.fallback.is_none());
    // q = expected batch over the *declared* 200 records.
    assert_eq!(
        s.ledger.events("s").unwrap(),
        vec![SgmEvent::new(0.1, 2.0, 7).unwrap()]
    );
    assert_eq!(s.ledger.source_events("wards").unwrap().len(), 1);
    // A replayed task is refused and charges nothing.
    let again = s.run(&study, &task).unwrap_err();
    assert_eq!(again.reason, DeclineReason::AlreadyPaid);
    // A coordinator that under-prices a round (fewer steps than the plan runs) is refused.
    task.round = 2;
    task.cost = SgmEvent::new(0.1, 2.0, 3).unwrap();
    let cheap = s.run(&study, &task).unwrap_err();
    assert_eq!(cheap.reason, DeclineReason::InvalidTask);
    // A task whose terms differ from the announcement's is refused before any charge.
    let mut lower = task_for(&study, 3);
    lower.noise_multiplier = 1.0;
    assert_eq!(
        s.run(&study, &lower).unwrap_err().reason,
        DeclineReason::TermsDiffer
    );
    assert_eq!(s.ledger.events("s").unwrap().len(), 1);
}

#[test]
fn every_term_outside_what_the_site_pinned_is_refused() {
    let s = site("record", "");
    let base = announcement(PrivacyUnit::Record, &["age", "lab_value"]);
    assert!(s.prepare(&base).is_ok());
    let mut cases: Vec<(&str, StudyAnnouncement)> = Vec::new();
    let mut a = base.clone();
    a.unit = PrivacyUnit::Site;
    a.local = LocalPlan::Sgd {
        epochs: 1,
        batch_size: 8,
        learning_rate: 0.1,
    };
    cases.push(("unit", a));
    let mut a = base.clone();
    a.placement = Placement::Central;
    cases.push(("placement", a));
    let mut a = base.clone();
    a.noise_multiplier = 0.99;
    cases.push(("lower sigma", a));
    let mut a = base.clone();
    a.clip_norm = 2.0;
    cases.push(("clip", a));
    let mut a = base.clone();
    a.local = LocalPlan::DpSgd {
        steps: 7,
        expected_batch: 41.0,
        learning_rate: 0.5,
    };
    cases.push(("higher q", a));
    let mut a = base.clone();
    a.local = LocalPlan::DpSgd {
        steps: 11,
        expected_batch: 20.0,
        learning_rate: 0.5,
    };
    cases.push(("more steps", a));
    let mut a = base.clone();
    a.delta = 2e-5;
    cases.push(("delta", a));
    let mut a = base.clone();
    a.data.features.push("zip".into());
    a.data.ranges.push([0.0, 1.0]);
    a.data.fills.push(None);
    cases.push(("new column", a));
    let mut a = base.clone();
    a.data.label = "age".into();
    cases.push(("label", a));
    let mut a = base.clone();
    a.data.fills[0] = Some(1.0);
    cases.push(("fill", a));
    let mut a = base.clone();
    a.data.task = TaskKind::Regression;
    a.data.label_range = Some([0.0, 1.0]);
    cases.push(("task", a));
    for (what, ann) in cases {
        let r = s.prepare(&ann).unwrap_err();
        assert_eq!(r.reason, DeclineReason::TermsDiffer, "{what}: {}", r.detail);
    }
    // Not enrolled: another study id.
    let mut other = base.clone();
    other.study = "other".into();
    assert_eq!(
        s.prepare(&other).unwrap_err().reason,
        DeclineReason::NotEnrolled
    );
    // Fewer columns than allowed is fine (minimum necessary).
    assert!(s
        .prepare(&announcement(PrivacyUnit::Record, &["lab_value"]))
        .is_ok());
}

#[test]
fn central_placement_needs_the_sites_explicit_opt_in() {
    let mut ann = announcement(PrivacyUnit::Site, &["age"]);
    ann.placement = Placement::Central;
    let s = site("site", "");
    assert_eq!(
        s.prepare(&ann).unwrap_err().reason,
        DeclineReason::TermsDiffer
    );
    let s = site("site", "placements = [\"local\", \"central\"]");
    assert!(s.prepare(&ann).is_ok());
}

#[test]
fn after_the_first_spend_the_terms_are_fixed() {
    let mut s = site("record", "");
    let ann = announcement(PrivacyUnit::Record, &["age", "lab_value"]);
    // Before any spend, a re-announcement with other (acceptable) terms replaces it.
    let mut earlier = ann.clone();
    earlier.delta = 1e-7;
    assert!(s.prepare(&earlier).is_ok());
    let study = s.prepare(&ann).unwrap();
    s.run(&study, &task_for(&study, 1)).unwrap();
    // The same terms again are fine; any change is refused now, even within the pins.
    assert!(s.prepare(&ann).is_ok());
    let mut changes: Vec<StudyAnnouncement> = Vec::new();
    let mut a = ann.clone();
    a.delta = 1e-7;
    changes.push(a);
    let mut a = ann.clone();
    a.data.features = vec!["age".into()];
    a.data.ranges.truncate(1);
    a.data.fills.truncate(1);
    changes.push(a);
    let mut a = ann.clone();
    a.model = Architecture::mlp(3);
    changes.push(a);
    let mut a = ann.clone();
    a.noise_multiplier = 3.0;
    changes.push(a);
    for a in changes {
        let r = s.prepare(&a).unwrap_err();
        assert_eq!(r.reason, DeclineReason::TermsDiffer);
        assert!(r.detail.contains("already paid"), "{}", r.detail);
    }
}

#[test]
fn a_crafted_model_is_refused_before_the_spend() {
    let mut s = site("record", "");
    let study = s
        .prepare(&announcement(PrivacyUnit::Record, &["age"]))
        .unwrap();
    let task = task_for(&study, 1);
    let mut huge = vec![0.0f32; study.spec.num_values()];
    huge[0] = 2.0 * MAX_MODEL_ABS;
    let r = s.run_with(&study, &task, huge).unwrap_err();
    assert_eq!(r.reason, DeclineReason::InvalidTask);
    assert!(s.ledger.events("s").unwrap().is_empty());
}

#[test]
fn a_diverging_site_unit_delta_is_released_as_clipped_noise_not_an_error() {
    let mut s = site("site", "");
    let mut ann = announcement(PrivacyUnit::Site, &["age", "lab_value"]);
    ann.local = LocalPlan::Sgd {
        epochs: 3,
        batch_size: 4,
        learning_rate: f32::MAX,
    };
    let study = s.prepare(&ann).unwrap();
    let released = s.run(&study, &task_for(&study, 1)).unwrap();
    assert!(released.zeroed);
    assert!(released.update.iter().all(|v| v.is_finite()));
    // Only the noise is left: N(0, (sigma C)^2) per value, here sigma C = 2.
    let n = released.update.len() as f64;
    let norm = fedpriv_common::model::l2_norm(&released.update);
    assert!(norm > 0.0 && norm < 2.0 * (n.sqrt() + 8.0));
    assert_eq!(s.ledger.events("s").unwrap().len(), 1);
}

#[test]
fn noise_only_stand_in_has_the_rounds_noise_scale() {
    let round = DpSgdRound {
        steps: 9,
        q: 0.1,
        expected_batch: 20.0,
        learning_rate: 0.5,
        clip: 1.0,
        noise_multiplier: 2.0,
    };
    let mut noise = NoiseSource::from_os().unwrap();
    let z = round.noise_only(200_000, &mut noise);
    let var = z.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / z.len() as f64;
    // (lr / B)^2 * steps * (sigma C)^2 = (0.025)^2 * 9 * 4.
    let want = 0.025f64.powi(2) * 9.0 * 4.0;
    assert!((var / want - 1.0).abs() < 0.02, "{var} vs {want}");
}

/// 40 patients: an ordinary feature, a ZIP code stored as a number, a label.
fn write_zip_data(dir: &std::path::Path) -> Vec<String> {
    let zips: Vec<String> = (0..40).map(|i| format!("0{}", 2101 + i * 3)).collect();
    let mut text = String::from("age,lab_value,y\n");
    for (i, z) in zips.iter().enumerate() {
        text.push_str(&format!("{},{z},{}\n", 30 + i, i % 2));
    }
    std::fs::write(dir.join("patients.csv"), text).unwrap();
    zips
}

#[test]
fn a_column_with_identifier_values_makes_the_study_unavailable_from_start_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let zips = write_zip_data(dir.path());
    let ann = announcement(PrivacyUnit::Record, &["age", "lab_value"]);

    let cfg = config(dir.path(), "record", "");
    let loaded = load_site_data(&cfg);
    let load = &loaded["s"];
    let msg = load.result.as_ref().unwrap_err();
    assert!(msg.contains("lab_value") && msg.contains("ZIP"), "{msg}");
    let check = load.columns.as_ref().unwrap();
    assert_eq!(check.refused.len(), 1);
    assert_eq!(check.refused[0].kind, IdentifierKind::ZipCode);
    assert!(check.values_checked);
    let details = check.details().to_string();
    for z in &zips {
        assert!(!msg.contains(z.as_str()) && !details.contains(z.as_str()));
    }
    // Every announcement is answered the same, whatever columns it asks for.
    for features in [&["age", "lab_value"][..], &["age"][..]] {
        let r = prepare_study(
            &cfg,
            &loaded,
            None,
            &announcement(PrivacyUnit::Record, features),
            None,
        )
        .unwrap_err();
        assert_eq!(r.reason, DeclineReason::Unavailable);
    }

    let allowed = config(
        dir.path(),
        "record",
        "allow_identifier_columns = [\"lab_value\"]",
    );
    let loaded = load_site_data(&allowed);
    let check = loaded["s"].columns.as_ref().unwrap();
    assert!(check.passed());
    assert_eq!(check.allowed_by_config, ["lab_value"]);
    assert_eq!(check.allowed_matches[0].kind, IdentifierKind::ZipCode);
    let prepared = prepare_study(&allowed, &loaded, None, &ann, None).unwrap();
    assert_eq!(prepared.data.n, 40);
}

#[test]
fn a_column_named_like_an_identifier_is_refused_before_the_file_is_read() {
    let dir = tempfile::tempdir().unwrap();
    // No data file at all: the names alone decide.
    let toml_cfg = config(dir.path(), "record", "");
    let mut cfg = toml_cfg.clone();
    let study = cfg.studies.get_mut("s").unwrap();
    study.terms.features = vec!["age".into(), "patient_ssn".into()];
    let loaded = load_site_data(&cfg);
    let msg = loaded["s"].result.as_ref().unwrap_err();
    assert!(msg.contains("patient_ssn") && msg.contains("social security"));
    let check = loaded["s"].columns.as_ref().unwrap();
    assert!(!check.values_checked);
    assert_eq!(check.checked, ["age", "patient_ssn", "y"]);
}

#[test]
fn unusable_records_are_skipped_or_filled_at_load_and_never_refuse_the_study() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("patients.csv"),
        "age,lab_value,y\n40,1.5,1\n,2.5,0\n41,,1\n42,3.5,7\n43,4.5,\nbad,line\n44,5.5,0\n",
    )
    .unwrap();
    let cfg = config(dir.path(), "record", "fills = { age = 50.0 }");
    let loaded = load_site_data(&cfg);
    let l = loaded["s"].result.as_ref().unwrap();
    // Kept: row 1, row 2 (age filled), row 6. Skipped: a missing lab value without a fill,
    // a label 7, a missing label, a malformed line.
    assert_eq!(l.data.n, 3);
    assert_eq!(l.report.filled, 1);
    assert_eq!(l.report.skipped_cell, 1);
    assert_eq!(l.report.skipped_label, 2);
    assert_eq!(l.report.skipped_malformed, 1);
    assert_eq!(l.data.row(1), &[50.0, 2.5]);
}

// ---------------------------------------------------------------------------------------
// Data where hospitals keep it

/// A site config whose one study reads `source` (a TOML table body) with `study_extra`.
fn config_with(dir: &std::path::Path, source: &str, study: &str) -> SiteConfig {
    let toml = format!(
        "[site]\nname = \"st-marys\"\nstate_dir = \"state\"\n\n\
         [coordinator]\naddress = \"127.0.0.1:7443\"\nserver_name = \"localhost\"\n\n\
         [tls]\nca = \"ca.pem\"\ncert = \"site.pem\"\nkey = \"site.key\"\n\n\
         [sources.wards]\nrecords = 200\ndelta = 1e-5\nepsilon_cap = 50.0\n{source}\n\n\
         [studies.s]\nsource = \"wards\"\nepsilon_cap = 20.0\nunit = \"record\"\nlabel = \"y\"\n\
         clip_norm = 1.0\nmin_noise_multiplier = 1.0\nmax_delta = 1e-5\n\
         max_sample_rate = 0.2\nmax_steps_per_round = 10\n{study}\n"
    );
    SiteConfig::from_toml(&toml, dir).unwrap()
}

fn ready(cfg: &SiteConfig, ann: &StudyAnnouncement) -> PreparedStudy {
    let loaded = load_site_data(cfg);
    if let Err(e) = &loaded["s"].result {
        panic!("{e}");
    }
    prepare_study(cfg, &loaded, None, ann, None).unwrap()
}

#[test]
fn categorical_columns_map_to_the_studys_categories_with_an_other_slot() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("patients.csv"),
        "age,ward,y\n40,A,1\n50,B,0\n60,Z,1\n70,,0\n",
    )
    .unwrap();
    let cfg = config_with(
        dir.path(),
        "path = \"patients.csv\"",
        "task = \"binary\"\nfeatures = [\"age\", \"ward\"]\ncategorical = [\"ward\"]",
    );
    let mut ann = announcement(PrivacyUnit::Record, &["age"]);
    ann.data.categorical = vec![fedpriv_common::config::CategoricalColumn {
        name: "ward".into(),
        categories: vec!["B".into(), "A".into()],
        embedding: Some(2),
    }];
    ann.model = Architecture::mlp(3);
    let study = ready(&cfg, &ann);
    assert_eq!(study.data.d, 2);
    // A -> 1, B -> 0, an unknown value and a missing one -> the other slot (2).
    let cats: Vec<f32> = (0..4).map(|i| study.data.row(i)[1]).collect();
    assert_eq!(cats, [1.0, 0.0, 2.0, 2.0]);
    // The learner embeds it: a 3-slot table of width 2 heads the model.
    assert_eq!(study.spec.tensors[0].shape, [3, 2]);
    // A column the site did not pin as categorical cannot be announced as one.
    let cfg2 = config_with(
        dir.path(),
        "path = \"patients.csv\"",
        "task = \"binary\"\nfeatures = [\"age\", \"ward\"]",
    );
    let loaded = load_site_data(&cfg2);
    assert_eq!(
        prepare_study(&cfg2, &loaded, None, &ann, None)
            .unwrap_err()
            .reason,
        DeclineReason::TermsDiffer
    );
    // And the round runs through the embedding.
    let mut s = site("record", "");
    s.cfg = cfg;
    s.loaded = load_site_data(&s.cfg);
    let study = s.prepare(&ann).unwrap();
    let released = s.run(&study, &task_for(&study, 1)).unwrap();
    assert_eq!(released.update.len(), study.spec.num_values());
}

/// An `.npy` file of `shape` with little-endian f32 `values`.
fn npy_f32(shape: &[usize], values: &[f32]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    for v in values {
        out.extend(v.to_le_bytes());
    }
    out
}

#[test]
fn npy_arrays_load_the_named_columns_and_skip_unusable_labels() {
    let dir = tempfile::tempdir().unwrap();
    // 5 records of 3 columns; record 2 has a NaN in column b (no fill: skipped), record 4
    // a label of 7 (skipped).
    let x = [
        1.0,
        2.0,
        3.0,
        4.0,
        5.0,
        6.0,
        7.0,
        f32::NAN,
        9.0,
        10.0,
        11.0,
        12.0,
        13.0,
        14.0,
        15.0,
    ];
    std::fs::write(dir.path().join("x.npy"), npy_f32(&[5, 3], &x)).unwrap();
    std::fs::write(
        dir.path().join("y.npy"),
        npy_f32(&[5], &[0.0, 1.0, 1.0, 0.0, 7.0]),
    )
    .unwrap();
    let cfg = config_with(
        dir.path(),
        "path = \"x.npy\"\nformat = \"npy\"\nlabels = \"y.npy\"\ncolumns = [\"a\", \"b\", \"c\"]",
        "task = \"binary\"\nfeatures = [\"c\", \"b\"]",
    );
    let loaded = load_site_data(&cfg);
    let l = loaded["s"].result.as_ref().unwrap();
    assert_eq!(l.data.n, 3);
    assert_eq!(l.report.skipped_cell, 1);
    assert_eq!(l.report.skipped_label, 1);
    assert_eq!(l.data.row(0), &[3.0, 2.0]);
    assert_eq!(l.data.row(2), &[12.0, 11.0]);
}

#[test]
fn parquet_files_load_only_the_studys_columns() {
    use parquet::data_type::{ByteArray, ByteArrayType, DoubleType, Int32Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let dir = tempfile::tempdir().unwrap();
    let schema = std::sync::Arc::new(
        parquet::schema::parser::parse_message_type(
            "message m { required double a; optional double b; required binary ward (UTF8); required int32 y; required binary note (UTF8); }",
        )
        .unwrap(),
    );
    let file = std::fs::File::create(dir.path().join("p.parquet")).unwrap();
    let props = std::sync::Arc::new(WriterProperties::builder().build());
    let mut w = SerializedFileWriter::new(file, schema, props).unwrap();
    let mut rg = w.next_row_group().unwrap();
    let mut col = 0;
    while let Some(mut c) = rg.next_column().unwrap() {
        match col {
            0 => {
                c.typed::<DoubleType>()
                    .write_batch(&[1.0, 2.0, 3.0], None, None)
                    .unwrap();
            }
            // b is null in the second record.
            1 => {
                c.typed::<DoubleType>()
                    .write_batch(&[0.5, 0.7], Some(&[1, 0, 1]), None)
                    .unwrap();
            }
            2 | 4 => {
                let v: Vec<ByteArray> = ["A", "B", "A"]
                    .iter()
                    .map(|s| ByteArray::from(*s))
                    .collect();
                c.typed::<ByteArrayType>()
                    .write_batch(&v, None, None)
                    .unwrap();
            }
            _ => {
                c.typed::<Int32Type>()
                    .write_batch(&[1, 0, 1], None, None)
                    .unwrap();
            }
        }
        c.close().unwrap();
        col += 1;
    }
    rg.close().unwrap();
    w.close().unwrap();
    let cfg = config_with(
        dir.path(),
        "path = \"p.parquet\"\nformat = \"parquet\"",
        "task = \"binary\"\nfeatures = [\"a\", \"b\", \"ward\"]\ncategorical = [\"ward\"]\nfills = { b = -1.0 }",
    );
    let loaded = load_site_data(&cfg);
    let l = loaded["s"].result.as_ref().unwrap();
    assert_eq!(l.data.n, 3);
    assert_eq!(l.report.filled, 1);
    assert_eq!(l.data.row(1), &[2.0, -1.0, 1.0]);
    assert_eq!(l.dictionaries[2], ["A", "B"]);
    assert_eq!(l.data.y, [1.0, 0.0, 1.0]);
}

#[test]
fn image_folders_are_read_lazily_and_unreadable_files_are_skipped_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let imgs = dir.path().join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    // Three 4x4 grey images (pixel value 16 * k), one of them 8x8 (resized to 4x4), and a
    // manifest naming a fourth file that is not an image and a fifth that does not exist.
    for (k, size) in [(1u8, 4u32), (2, 4), (3, 8)] {
        let img = image::GrayImage::from_pixel(size, size, image::Luma([16 * k]));
        img.save(imgs.join(format!("{k}.png"))).unwrap();
    }
    std::fs::write(imgs.join("4.png"), b"not an image").unwrap();
    std::fs::write(
        dir.path().join("manifest.csv"),
        "file,y\n1.png,0\n2.png,1\n3.png,1\n4.png,0\n5.png,1\n",
    )
    .unwrap();
    let cfg = config_with(
        dir.path(),
        "path = \"manifest.csv\"\nformat = \"images\"\nroot = \"imgs\"",
        "task = \"binary\"\nimage_column = \"file\"",
    );
    let loaded = load_site_data(&cfg);
    let l = loaded["s"].result.as_ref().unwrap();
    assert_eq!(l.data.n, 3);
    assert_eq!(l.report.skipped_malformed, 2);
    let mut ann = announcement(PrivacyUnit::Record, &[]);
    ann.data.features.clear();
    ann.data.ranges.clear();
    ann.data.fills.clear();
    ann.data.image = Some(fedpriv_common::config::ImageSpec {
        file_column: "file".into(),
        channels: 1,
        height: 4,
        width: 4,
        mean: vec![0.0],
        std: vec![1.0],
    });
    ann.model = Architecture::Layers(vec![
        fedpriv_common::arch::Layer::Conv2d {
            channels: 2,
            kernel: 3,
            stride: 1,
            padding: 1,
        },
        fedpriv_common::arch::Layer::MaxPool { kernel: 2 },
        fedpriv_common::arch::Layer::Flatten,
        fedpriv_common::arch::Layer::Dense { units: 1 },
    ]);
    let study = prepare_study(&cfg, &loaded, None, &ann, None).unwrap();
    assert!(study.data.x.is_empty(), "rows are not held in memory");
    let mut rows = Vec::new();
    study.data.rows_into(&[0, 2], &mut rows);
    assert_eq!(rows.len(), 32);
    assert!(rows[..16].iter().all(|&v| (v - 16.0 / 255.0).abs() < 1e-6));
    assert!(rows[16..].iter().all(|&v| (v - 48.0 / 255.0).abs() < 1e-6));
    // A file gone since start reads as zeros; the round still runs.
    std::fs::remove_file(imgs.join("2.png")).unwrap();
    let mut s = site("record", "");
    s.cfg = cfg;
    s.loaded = loaded;
    let released = s.run(&study, &task_for(&study, 1)).unwrap();
    assert!(released.fallback.is_none());
    assert_eq!(released.update.len(), study.spec.num_values());
}

fn with_evaluation(mut ann: StudyAnnouncement, every: u64, sigma: f64) -> StudyAnnouncement {
    ann.evaluation = Some(fedpriv_common::evaluation::EvaluationPlan {
        every,
        noise_multiplier: fedpriv_common::dp::NoiseMultiplier::new(sigma).unwrap(),
        loss_clip: 2.0,
    });
    ann
}

#[test]
fn an_evaluation_is_paid_beside_its_round_and_only_on_the_plans_rounds() {
    let eval_pins = "evaluation = { holdout = 0.25, min_noise_multiplier = 3.0 }\n";
    let mut s = site("record", eval_pins);
    let ann = with_evaluation(announcement(PrivacyUnit::Record, &["age"]), 2, 4.0);
    let study = s.prepare(&ann).unwrap();
    // A quarter of the 200 records is held out and never trains.
    let held = study.holdout.as_ref().unwrap().n;
    assert!((20..=80).contains(&held), "{held} held out");
    assert_eq!(study.data.n + held, 200);

    // Round 1 carries no evaluation; a task that says it does is refused unpaid.
    let mut task = task_for(&study, 1);
    assert!(task.evaluation.is_none());
    task.evaluation = Some(ann.evaluation.unwrap().event());
    assert_eq!(
        s.run(&study, &task).unwrap_err().reason,
        DeclineReason::InvalidTask
    );
    let released = s.run(&study, &task_for(&study, 1)).unwrap();
    assert!(released.evaluation.is_none());

    // Round 3 does: leaving it out, or pricing it with less noise, is refused unpaid.
    let mut task = task_for(&study, 3);
    let due = task.evaluation.unwrap();
    task.evaluation = None;
    assert_eq!(
        s.run(&study, &task).unwrap_err().reason,
        DeclineReason::InvalidTask
    );
    task.evaluation = Some(SgmEvent::new(1.0, 3.5, 1).unwrap());
    assert_eq!(
        s.run(&study, &task).unwrap_err().reason,
        DeclineReason::InvalidTask
    );
    assert_eq!(s.ledger.events("s").unwrap().len(), 1);
    let released = s.run(&study, &task_for(&study, 3)).unwrap();
    let v = released.evaluation.unwrap();
    assert_eq!(v.len(), 2 + 2 * 2);
    assert!(v.iter().all(|x| x.is_finite()));
    // Both ledgers: the training event and the evaluation's, for the study and the source.
    let events = s.ledger.events("s").unwrap();
    assert_eq!(events.len(), 3);
    assert!(events.contains(&due));
    assert_eq!(s.ledger.source_events("wards").unwrap().len(), 3);
    assert_eq!(s.ledger.evaluation_rounds("s").unwrap(), vec![3]);
    assert_eq!(s.ledger.evaluation_spends("s").unwrap(), vec![(3, due)]);
    // The study's epsilon composes all three.
    let d = Delta::new(1e-6).unwrap();
    let with = s.ledger.epsilon("s", d, AccountantKind::Rdp).unwrap();
    let without =
        fedpriv_common::dp::accountant::epsilon(AccountantKind::Rdp, &events[..2], d).unwrap();
    assert!(with > without);
}

#[test]
fn a_study_asking_for_evaluation_the_site_has_not_pinned_or_with_less_noise_is_refused() {
    let ann = with_evaluation(announcement(PrivacyUnit::Record, &["age"]), 2, 4.0);
    let s = site("record", "");
    assert_eq!(
        s.prepare(&ann).unwrap_err().reason,
        DeclineReason::TermsDiffer
    );
    let s = site(
        "record",
        "evaluation = { holdout = 0.2, min_noise_multiplier = 5.0 }\n",
    );
    let r = s.prepare(&ann).unwrap_err();
    assert_eq!(r.reason, DeclineReason::TermsDiffer);
    assert!(r.detail.contains("evaluation noise"), "{}", r.detail);
    // A study without evaluation trains on every record even where the site pinned one.
    let s = site(
        "record",
        "evaluation = { holdout = 0.2, min_noise_multiplier = 1.0 }\n",
    );
    let plain = s
        .prepare(&announcement(PrivacyUnit::Record, &["age"]))
        .unwrap();
    assert!(plain.holdout.is_none());
    assert_eq!(plain.data.n, 200);
}

/// Terms pinned before evaluation existed (JSON in field order, no `evaluation` key) are
/// the text a study without evaluation still gets; a study with one carries it.
#[test]
fn terms_without_evaluation_keep_their_pinned_text() {
    let ann = announcement(PrivacyUnit::Record, &["age"]);
    let text = terms_text(&ann);
    assert!(text.starts_with("{\"study\":\"s\",\"model\":"), "{text}");
    assert!(!text.contains("evaluation"), "{text}");
    let full = serde_json::to_string(&ann).unwrap();
    assert_eq!(
        full,
        format!("{},\"evaluation\":null}}", &text[..text.len() - 1])
    );
    let with = with_evaluation(ann, 2, 4.0);
    assert!(terms_text(&with).contains("\"evaluation\":{\"every\":2"));
}
