//! The ODM reader against real OpenClinica exports, every XML and ODM quirk
//! the reader promises to handle, broken and hostile input, and generated
//! documents.
//!
//! Every input goes through every way in: the blocking reader with a large
//! and with a one-byte buffer, the async reader with a tiny buffer, the
//! counting path and both CLI commands; they must agree on every record and
//! every error, and a failing document must leave the CLI output empty.

use std::io::BufReader;
use std::path::PathBuf;

use ocsync::odm::cli::{self, CliError};
use ocsync::odm::generate::{self, GeneratorConfig};
use ocsync::odm::{self, OdmError, OdmReader, Record, Stats, Subject};
use proptest::prelude::*;

const ODM_OPEN: &str = r#"<ODM xmlns="http://www.cdisc.org/ns/odm/v1.3" xmlns:OpenClinica="http://www.openclinica.org/ns/odm_ext_v130/v3.1" ODMVersion="1.3">"#;

/// A document with one subject, one event, one form, one group holding
/// `items` (the lines inside ItemGroupData).
fn doc(items: &str) -> String {
    format!(
        "{ODM_OPEN}\n<ClinicalData StudyOID=\"S_1\">\n<SubjectData SubjectKey=\"SS_1\">\n\
         <StudyEventData StudyEventOID=\"SE_1\">\n<FormData FormOID=\"F_1\">\n\
         <ItemGroupData ItemGroupOID=\"IG_1\" ItemGroupRepeatKey=\"1\">\n{items}\n</ItemGroupData>\n\
         </FormData>\n</StudyEventData>\n</SubjectData>\n</ClinicalData>\n</ODM>\n"
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

fn sync_records<R: std::io::BufRead>(input: R) -> Result<(Vec<Record>, Stats), OdmError> {
    let mut reader = OdmReader::new(input);
    let mut records = Vec::new();
    while let Some(r) = reader.next_record()? {
        records.push(r);
    }
    Ok((records, reader.stats()))
}

fn async_records(xml: &[u8], capacity: usize) -> Result<(Vec<Record>, Stats), OdmError> {
    runtime().block_on(async {
        let mut reader = OdmReader::new(tokio::io::BufReader::with_capacity(capacity, xml));
        let mut records = Vec::new();
        while let Some(r) = reader.next_record_async().await? {
            records.push(r);
        }
        Ok((records, reader.stats()))
    })
}

/// Reads `xml` every way there is and insists they agree. Returns the
/// records and counts, or the error message.
fn read(xml: &[u8]) -> Result<(Vec<Record>, Stats), String> {
    let full = sync_records(xml).map_err(|e| e.to_string());
    let tiny = sync_records(BufReader::with_capacity(1, xml)).map_err(|e| e.to_string());
    let odd = sync_records(BufReader::with_capacity(7, xml)).map_err(|e| e.to_string());
    let asynchronous = async_records(xml, 5).map_err(|e| e.to_string());
    let async_large = async_records(xml, 1 << 16).map_err(|e| e.to_string());
    assert_eq!(full, tiny, "one-byte buffer disagrees");
    assert_eq!(full, odd, "seven-byte buffer disagrees");
    assert_eq!(full, asynchronous, "async reader disagrees");
    assert_eq!(full, async_large, "async reader (large buffer) disagrees");
    let counted = odm::count(xml).map_err(|e| e.to_string());
    let counted_async = runtime()
        .block_on(odm::count_async(tokio::io::BufReader::with_capacity(
            3, xml,
        )))
        .map_err(|e| e.to_string());
    assert_eq!(counted, counted_async, "async count disagrees");
    match &full {
        Ok((_, stats)) => assert_eq!(counted.as_ref(), Ok(stats), "count disagrees"),
        Err(e) => assert_eq!(counted.as_ref().err(), Some(e), "count disagrees"),
    }
    // The commands: output only on success, the same error otherwise.
    let mut out = Vec::new();
    let stats = cli::stats(xml, &mut out).map_err(|e| e.to_string());
    let mut dump_out = Vec::new();
    let dumped = cli::dump_spooled(xml, &mut dump_out, 64).map_err(|e| e.to_string());
    if let Err(e) = &full {
        assert_eq!(stats.as_ref().err(), Some(e));
        assert_eq!(dumped.as_ref().err(), Some(e));
        assert!(out.is_empty(), "stats wrote output for a broken document");
        assert!(
            dump_out.is_empty(),
            "dump wrote output for a broken document"
        );
    } else {
        assert!(stats.is_ok() && dumped.is_ok());
    }
    full
}

fn subjects(xml: &[u8]) -> Vec<Subject> {
    read(xml)
        .unwrap()
        .0
        .into_iter()
        .filter_map(|r| match r {
            Record::Subject(s) => Some(*s),
            Record::Study(_) => None,
        })
        .collect()
}

fn dump(xml: &[u8]) -> String {
    let mut out = Vec::new();
    cli::dump(xml, &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

/// The `(item OID, value)` pairs of a document, in order.
fn values(xml: &[u8]) -> Vec<(String, Option<String>)> {
    subjects(xml)
        .iter()
        .flat_map(|s| {
            s.items()
                .map(|(_, _, _, i)| (i.oid.clone(), i.value.clone()))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn check_values(xml: &str, want: &[(&str, Option<&str>)]) {
    let got = values(xml.as_bytes());
    let want: Vec<_> = want
        .iter()
        .map(|(k, v)| (k.to_string(), v.map(str::to_owned)))
        .collect();
    assert_eq!(got, want, "{xml}");
}

/// Asserts the document is refused with exactly this message at this line
/// and column, the same way on every path.
fn check_err(xml: impl AsRef<[u8]>, line: u64, column: u64, message: &str) {
    let xml = xml.as_ref();
    let err = read(xml).expect_err("expected an error");
    let e = sync_records(xml).unwrap_err();
    let pos = e.position();
    assert_eq!(
        (pos.line, pos.column),
        (line, column),
        "position of: {err}\nin {:?}",
        String::from_utf8_lossy(xml)
    );
    let tail = err.split_once("): ").map(|(_, t)| t).unwrap_or(&err);
    assert_eq!(tail, message, "message of: {err}");
    assert!(err.starts_with(&format!("line {line}, column {column} (byte ")));
}

fn real_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/odm-real");
    dir.is_dir().then_some(dir)
}

// ---------------------------------------------------------------- real data

#[test]
fn real_exports_give_the_expected_stats_and_items() {
    let Some(dir) = real_dir() else { return };
    for name in ["oc33-full-extract", "oc314-rest-study"] {
        let xml = std::fs::read(dir.join(format!("{name}.xml"))).unwrap();
        let want_stats = std::fs::read_to_string(dir.join(format!("{name}.stats.json"))).unwrap();
        let want_items = std::fs::read_to_string(dir.join(format!("{name}.items.ndjson"))).unwrap();
        read(&xml).unwrap();
        let mut out = Vec::new();
        cli::stats(&xml[..], &mut out).unwrap();
        let got_stats = String::from_utf8(out).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&got_stats).unwrap(),
            serde_json::from_str::<serde_json::Value>(&want_stats).unwrap(),
            "{name}"
        );
        assert_eq!(got_stats, want_stats, "{name}: stats byte for byte");
        let got = dump(&xml);
        for (i, (g, w)) in got.lines().zip(want_items.lines()).enumerate() {
            let g: serde_json::Value = serde_json::from_str(g).unwrap();
            let w: serde_json::Value = serde_json::from_str(w).unwrap();
            assert_eq!(g, w, "{name} line {}", i + 1);
        }
        assert_eq!(got.lines().count(), want_items.lines().count(), "{name}");
        assert_eq!(got, want_items, "{name}: NDJSON byte for byte");
    }
}

#[test]
fn real_exports_give_typed_subjects_and_metadata() {
    let Some(dir) = real_dir() else { return };
    let xml = std::fs::read(dir.join("oc314-rest-study.xml")).unwrap();
    let (records, _) = read(&xml).unwrap();
    let Record::Study(study) = &records[0] else {
        panic!("metadata first")
    };
    assert_eq!(study.oid, "S_CPG_TEST");
    let mdv = &study.metadata_versions[0];
    assert!(!mdv.form_defs.is_empty());
    assert!(mdv.form_defs.iter().all(|f| f.parent_form_oid.is_some()));
    assert!(mdv.code_lists.iter().any(|c| !c.items.is_empty()));
    let found: Vec<_> = records
        .iter()
        .filter_map(|r| match r {
            Record::Subject(s) => Some(s),
            _ => None,
        })
        .collect();
    assert_eq!(found.len(), 3);
    let removed = found[0];
    assert_eq!(removed.subject_key, "SS_VICTIM_3_3185");
    assert_eq!(removed.study_subject_id.as_deref(), Some("VICTIM_3"));
    assert_eq!(removed.status.as_deref(), Some("removed"));
    assert_eq!(removed.sex.as_deref(), Some("null"));
    assert_eq!(removed.enrollment_date.as_deref(), Some("2017-07-20"));
    assert_eq!(
        removed.events[0].forms[0].status.as_deref(),
        Some("invalid")
    );
    assert_eq!(removed.events[0].end_date.as_deref(), Some("2017-07-20"));
    assert!(removed.audit.entries > 0);
    assert!(removed.audit.max_id.is_some() && removed.audit.latest_timestamp.is_some());

    let xml = std::fs::read(dir.join("oc33-full-extract.xml")).unwrap();
    let subjects = subjects(&xml);
    let sites: Vec<_> = subjects.iter().map(|s| s.study_oid.as_str()).collect();
    assert_eq!(sites, ["S_CHU_SANT", "S_PARCSALU"]);
    let repeats: Vec<_> = subjects[1]
        .events
        .iter()
        .filter_map(|e| e.repeat_key.as_deref())
        .collect();
    assert!(repeats.contains(&"4"), "{repeats:?}");
}

// ------------------------------------------------------------------ records

#[test]
fn subject_event_form_group_and_item_fields_are_read() {
    let xml = format!(
        r#"{ODM_OPEN}
<ClinicalData StudyOID="S_SITE" MetaDataVersionOID="v1">
<SubjectData SubjectKey="SS_A" OpenClinica:StudySubjectID="A-1" OpenClinica:UniqueIdentifier="U1" OpenClinica:SecondaryID="S2" OpenClinica:Status="signed" OpenClinica:Sex="f" OpenClinica:YearOfBirth="1980" OpenClinica:EnrollmentDate="2020-02-03">
<StudyEventData StudyEventOID="SE_V" StudyEventRepeatKey="2" OpenClinica:StartDate="2020-02-03 10:11:12.0" OpenClinica:EndDate="2020-02-04" OpenClinica:Status="completed">
<FormData FormOID="F_X_V1" OpenClinica:Version="v1" OpenClinica:Status="invalid" OpenClinica:InterviewDate="2020-02-03" OpenClinica:InterviewerName="nurse" OpenClinica:CreatedDate="2020-02-03 10:00:00" OpenClinica:UpdatedDate="2020-02-05 11:00:00">
<ItemGroupData ItemGroupOID="IG_S" ItemGroupRepeatKey="3" TransactionType="Insert">
<ItemData ItemOID="I_T" Value="BLOOD"/>
<ItemData ItemOID="I_N" IsNull="Yes" OpenClinica:ReasonForNull="NASK"/>
</ItemGroupData>
</FormData>
</StudyEventData>
<OpenClinica:AuditLogs EntityID="SS_A">
<OpenClinica:AuditLog ID="AL_9" DateTimeStamp="2020-01-01T00:00:09"/>
<OpenClinica:AuditLog ID="AL_10" DateTimeStamp="2020-01-01T00:00:08"/>
</OpenClinica:AuditLogs>
</SubjectData>
</ClinicalData>
</ODM>"#
    );
    let s = &subjects(xml.as_bytes())[0];
    let want = Subject {
        study_oid: "S_SITE".into(),
        metadata_version_oid: Some("v1".into()),
        subject_key: "SS_A".into(),
        study_subject_id: Some("A-1".into()),
        unique_identifier: Some("U1".into()),
        secondary_id: Some("S2".into()),
        status: Some("signed".into()),
        sex: Some("f".into()),
        date_of_birth: None,
        year_of_birth: Some("1980".into()),
        enrollment_date: Some("2020-02-03".into()),
        events: vec![odm::StudyEvent {
            oid: "SE_V".into(),
            repeat_key: Some("2".into()),
            start_date: Some("2020-02-03 10:11:12.0".into()),
            end_date: Some("2020-02-04".into()),
            status: Some("completed".into()),
            forms: vec![odm::Form {
                oid: "F_X_V1".into(),
                version: Some("v1".into()),
                status: Some("invalid".into()),
                interview_date: Some("2020-02-03".into()),
                interviewer_name: Some("nurse".into()),
                created_date: Some("2020-02-03 10:00:00".into()),
                updated_date: Some("2020-02-05 11:00:00".into()),
                item_groups: vec![odm::ItemGroup {
                    oid: "IG_S".into(),
                    repeat_key: Some("3".into()),
                    transaction_type: Some("Insert".into()),
                    items: vec![
                        odm::Item {
                            oid: "I_T".into(),
                            value: Some("BLOOD".into()),
                            reason_for_null: None,
                        },
                        odm::Item {
                            oid: "I_N".into(),
                            value: None,
                            reason_for_null: Some("NASK".into()),
                        },
                    ],
                }],
            }],
        }],
        audit: odm::AuditSummary {
            entries: 2,
            max_id: Some("AL_10".into()),
            max_id_number: Some(10),
            latest_timestamp: Some("2020-01-01T00:00:09".into()),
        },
    };
    assert_eq!(*s, want);
    assert_eq!(
        dump(xml.as_bytes()),
        "{\"event_oid\": \"SE_V\", \"event_repeat_key\": \"2\", \"form_oid\": \"F_X_V1\", \"item_group_oid\": \"IG_S\", \"item_group_repeat_key\": \"3\", \"item_oid\": \"I_T\", \"study_oid\": \"S_SITE\", \"subject_key\": \"SS_A\", \"value\": \"BLOOD\"}\n\
         {\"event_oid\": \"SE_V\", \"event_repeat_key\": \"2\", \"form_oid\": \"F_X_V1\", \"item_group_oid\": \"IG_S\", \"item_group_repeat_key\": \"3\", \"item_oid\": \"I_N\", \"study_oid\": \"S_SITE\", \"subject_key\": \"SS_A\", \"value\": null}\n"
    );
    let mut out = Vec::new();
    cli::stats(xml.as_bytes(), &mut out).unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "{\"forms\": 1, \"item_groups\": 1, \"items\": 2, \"null_items\": 1, \"study_events\": 1, \"subjects\": 1}\n"
    );
}

#[test]
fn metadata_is_read_with_definitions_code_lists_and_parent_forms() {
    let xml = format!(
        r#"{ODM_OPEN}
<Study OID="S_1"><GlobalVariables><StudyName>Trial &amp; error</StudyName><ProtocolName>P<![CDATA[<1>]]></ProtocolName></GlobalVariables>
<MetaDataVersion OID="v1" Name="MDV">
<StudyEventDef OID="SE_1" Name="Visit" Repeating="Yes" Type="Scheduled"><FormRef FormOID="F_A_V2"/></StudyEventDef>
<FormDef OID="F_A_V2" Name="A" Repeating="No"><ItemGroupRef ItemGroupOID="IG_1"/><OpenClinica:FormDetails FormOID="F_A_V2" ParentFormOID="F_A"/></FormDef>
<ItemGroupDef OID="IG_1" Name="G" Repeating="Yes"><ItemRef ItemOID="I_1"/><ItemRef ItemOID="I_2"/></ItemGroupDef>
<ItemDef OID="I_1" Name="SEX" DataType="text" Length="1"><CodeListRef CodeListOID="CL_1"/></ItemDef>
<ItemDef OID="I_2" Name="AGE" DataType="integer"/>
<CodeList OID="CL_1" Name="Sex" DataType="text">
<CodeListItem CodedValue="m"><Decode><TranslatedText xml:lang="en">Male&#13;&#10;x</TranslatedText><TranslatedText>Second</TranslatedText></Decode></CodeListItem>
<CodeListItem CodedValue="f"><Decode><TranslatedText>Fe
male</TranslatedText></Decode></CodeListItem>
<EnumeratedItem CodedValue="u"/>
</CodeList>
</MetaDataVersion></Study>
</ODM>"#
    );
    let (records, stats) = read(xml.as_bytes()).unwrap();
    assert_eq!(stats, Stats::default());
    let [Record::Study(study)] = &records[..] else {
        panic!("{records:?}")
    };
    assert_eq!(study.name.as_deref(), Some("Trial & error"));
    assert_eq!(study.protocol_name.as_deref(), Some("P<1>"));
    let m = &study.metadata_versions[0];
    assert_eq!((m.oid.as_str(), m.name.as_deref()), ("v1", Some("MDV")));
    assert_eq!(m.study_event_defs[0].form_oids, ["F_A_V2"]);
    assert!(m.study_event_defs[0].repeating);
    assert_eq!(
        m.study_event_defs[0].event_type.as_deref(),
        Some("Scheduled")
    );
    assert_eq!(m.form_defs[0].parent_form_oid.as_deref(), Some("F_A"));
    assert_eq!(m.form_defs[0].item_group_oids, ["IG_1"]);
    assert!(!m.form_defs[0].repeating);
    assert!(m.item_group_defs[0].repeating);
    assert_eq!(m.item_group_defs[0].item_oids, ["I_1", "I_2"]);
    assert_eq!(m.item_defs[0].code_list_oid.as_deref(), Some("CL_1"));
    assert_eq!(m.item_defs[0].data_type.as_deref(), Some("text"));
    assert_eq!(m.item_defs[1].name.as_deref(), Some("AGE"));
    let items: Vec<_> = m.code_lists[0]
        .items
        .iter()
        .map(|i| (i.coded_value.as_str(), i.decode.as_deref()))
        .collect();
    assert_eq!(
        items,
        [
            ("m", Some("Male\r\nx")),
            ("f", Some("Fe\nmale")),
            ("u", None)
        ]
    );
}

// ------------------------------------------------------------ value quirks

#[test]
fn values_stay_raw() {
    check_values(
        &doc(r#"<ItemData ItemOID="I_1" Value="41 "/>
<ItemData ItemOID="I_2" Value=""/>
<ItemData ItemOID="I_3"/>
<ItemData ItemOID="I_4" IsNull="Yes"/>
<ItemData ItemOID="I_5" IsNull="Yes" Value="ignored"/>
<ItemData ItemOID="I_6" Value="null"/>
<ItemData ItemOID="I_7" Value="1,2"/>
<ItemData ItemOID="I_8" Value="1992-06"/>
<ItemData ItemOID="I_9" Value="  x  "/>
<ItemData ItemOID="I_10" IsNull="No" Value="v"/>
<ItemData ItemOID="I_11" Value='single "quoted"'/>"#),
        &[
            ("I_1", Some("41 ")),
            ("I_2", Some("")),
            ("I_3", None),
            ("I_4", None),
            ("I_5", None),
            ("I_6", Some("null")),
            ("I_7", Some("1,2")),
            ("I_8", Some("1992-06")),
            ("I_9", Some("  x  ")),
            ("I_10", Some("v")),
            ("I_11", Some("single \"quoted\"")),
        ],
    );
    let (_, stats) = read(
        doc(r#"<ItemData ItemOID="I_4" IsNull="Yes"/><ItemData ItemOID="I_5" IsNull="yes"/>"#)
            .as_bytes(),
    )
    .unwrap();
    assert_eq!((stats.items, stats.null_items), (2, 1));
}

#[test]
fn attribute_values_are_decoded_and_normalised_as_xml_1_0_requires() {
    check_values(
        &doc("<ItemData ItemOID=\"I_1\" Value=\"a\tb\"/>\n\
              <ItemData ItemOID=\"I_2\" Value=\"a\nb\"/>\n\
              <ItemData ItemOID=\"I_3\" Value=\"a\r\nb\"/>\n\
              <ItemData ItemOID=\"I_4\" Value=\"a\rb\"/>\n\
              <ItemData ItemOID=\"I_5\" Value=\"a&#10;b&#13;c&#9;d&#xA;\"/>\n\
              <ItemData ItemOID=\"I_6\" Value=\"&lt;&gt;&amp;&apos;&quot;\"/>\n\
              <ItemData ItemOID=\"I_7\" Value=\"&#233;&#x2013;&#x1F600;\"/>\n\
              <ItemData ItemOID=\"I_8\" Value=\"é – ≥\"/>\n\
              <ItemData ItemOID=\"I_9\" Value=\"&amp;lt;\"/>\n\
              <ItemData ItemOID=\"I_10\" Value=\"&#38;#38;\"/>\n\
              <ItemData ItemOID=\"I_11\" Value=\"a>b\"/>\n\
              <ItemData ItemOID=\"I_12\" Value=\"\r\n\r\n\"/>"),
        &[
            ("I_1", Some("a b")),
            ("I_2", Some("a b")),
            ("I_3", Some("a b")),
            ("I_4", Some("a b")),
            ("I_5", Some("a\nb\rc\td\n")),
            ("I_6", Some("<>&'\"")),
            ("I_7", Some("é–😀")),
            ("I_8", Some("é – ≥")),
            ("I_9", Some("&lt;")),
            ("I_10", Some("&#38;")),
            ("I_11", Some("a>b")),
            ("I_12", Some("  ")),
        ],
    );
    // Character references in names' places are not names, and whitespace
    // around `=` is allowed.
    check_values(
        &doc("<ItemData\n ItemOID = 'I_1'\r\n\tValue\n=\n\"x\" />"),
        &[("I_1", Some("x"))],
    );
}

#[test]
fn non_ascii_values_are_escaped_in_ndjson_like_python_does() {
    let out = dump(doc(r#"<ItemData ItemOID="I_1" Value="é&#10;&quot;\ 😀"/>"#).as_bytes());
    assert!(
        out.ends_with(
            r#""value": "\u00e9\n\"\\ \ud83d\ude00"}
"#
        ),
        "{out}"
    );
}

// --------------------------------------------------------------- namespaces

#[test]
fn namespaces_are_matched_by_uri_not_prefix() {
    let usual = format!(
        r#"{ODM_OPEN}<ClinicalData StudyOID="S"><SubjectData SubjectKey="SS" OpenClinica:Status="available" OpenClinica:StudySubjectID="L"><StudyEventData StudyEventOID="E" OpenClinica:StartDate="2020-01-01"><FormData FormOID="F"><ItemGroupData ItemGroupOID="G"><ItemData ItemOID="I" Value="v"/></ItemGroupData></FormData></StudyEventData></SubjectData></ClinicalData></ODM>"#
    );
    let prefixed = r#"<odm:ODM xmlns:odm="http://www.cdisc.org/ns/odm/v1.3" xmlns:oc="http://www.openclinica.org/ns/odm_ext_v130/v3.1"><odm:ClinicalData StudyOID="S"><odm:SubjectData SubjectKey="SS" oc:Status="available" oc:StudySubjectID="L"><odm:StudyEventData StudyEventOID="E" oc:StartDate="2020-01-01"><odm:FormData FormOID="F"><odm:ItemGroupData ItemGroupOID="G"><odm:ItemData ItemOID="I" Value="v"/></odm:ItemGroupData></odm:FormData></odm:StudyEventData></odm:SubjectData></odm:ClinicalData></odm:ODM>"#;
    let legacy = usual.replace("odm_ext_v130", "odm_ext_v121");
    // Declarations may sit on any element, and be re-bound inside.
    let scattered = r#"<ODM xmlns="http://www.cdisc.org/ns/odm/v1.3"><ClinicalData StudyOID="S" xmlns:x="urn:not-oc"><SubjectData xmlns:x="http://www.openclinica.org/ns/odm_ext_v130/v3.1" SubjectKey="SS" x:Status="available" x:StudySubjectID="L"><e:StudyEventData xmlns:e="http://www.cdisc.org/ns/odm/v1.3" StudyEventOID="E" x:StartDate="2020-01-01"><FormData xmlns="http://www.cdisc.org/ns/odm/v1.3" FormOID="F"><ItemGroupData ItemGroupOID="G"><ItemData ItemOID="I" Value="v"/></ItemGroupData></FormData></e:StudyEventData></SubjectData></ClinicalData></ODM>"#;
    let want = read(usual.as_bytes()).unwrap();
    assert_eq!(want.1.items, 1);
    let s = &subjects(usual.as_bytes())[0];
    assert_eq!(s.status.as_deref(), Some("available"));
    assert_eq!(s.events[0].start_date.as_deref(), Some("2020-01-01"));
    for other in [prefixed, &legacy, scattered] {
        assert_eq!(read(other.as_bytes()).unwrap(), want, "{other}");
    }
}

#[test]
fn elements_and_attributes_in_other_namespaces_are_not_odm() {
    let xml = doc(r#"<ItemData ItemOID="I_1" Value="counted"/>
<ItemData xmlns="urn:other" ItemOID="I_2" Value="other default namespace"/>
<x:ItemData xmlns:x="urn:other" ItemOID="I_3" Value="other prefix"/>
<OpenClinica:ItemData ItemOID="I_4" Value="extension namespace"/>
<o:ItemData xmlns:o="http://www.cdisc.org/ns/odm/v1.3" ItemOID="I_5" Value="odm by prefix"/>
<ItemData ItemOID="I_6" x:Value="attribute in another namespace" xmlns:x="urn:x"/>
<ItemData ItemOID="I_7" OpenClinica:IsNull="Yes" Value="IsNull must be unprefixed"/>"#);
    check_values(
        &xml,
        &[
            ("I_1", Some("counted")),
            ("I_5", Some("odm by prefix")),
            ("I_6", None),
            ("I_7", Some("IsNull must be unprefixed")),
        ],
    );
    // OpenClinica attributes need the extension namespace, not the name.
    let s = &subjects(
        br#"<ODM xmlns="http://www.cdisc.org/ns/odm/v1.3" xmlns:OpenClinica="urn:impostor" xmlns:oc="http://www.openclinica.org/ns/odm_ext_v130/v3.1"><ClinicalData StudyOID="S"><SubjectData SubjectKey="K" Status="plain" OpenClinica:Sex="impostor" oc:Status="real"/></ClinicalData></ODM>"#,
    )[0];
    assert_eq!(
        (s.status.as_deref(), s.sex.as_deref()),
        (Some("real"), None)
    );
}

// ------------------------------------------------------- skipped elements

#[test]
fn audit_logs_notes_annotations_and_unknown_elements_are_skipped_everywhere() {
    let xml = format!(
        r#"{ODM_OPEN}
<Annotation SeqNum="1"><ClinicalData StudyOID="X"><SubjectData SubjectKey="HIDDEN"/></ClinicalData></Annotation>
<ClinicalData StudyOID="S">
<Unknown><SubjectData SubjectKey="HIDDEN2"/></Unknown>
<SubjectData SubjectKey="SS_1">
<OpenClinica:DiscrepancyNotes><OpenClinica:DiscrepancyNote><StudyEventData StudyEventOID="HIDDEN"/></OpenClinica:DiscrepancyNote></OpenClinica:DiscrepancyNotes>
<Annotation><StudyEventData StudyEventOID="HIDDEN"/></Annotation>
<StudyEventData StudyEventOID="SE_1">
<OpenClinica:AuditLogs><OpenClinica:AuditLog ID="AL_5" DateTimeStamp="2021-01-01T00:00:00"><FormData FormOID="HIDDEN"/></OpenClinica:AuditLog></OpenClinica:AuditLogs>
<FormData FormOID="F_1">
<Annotation><ItemGroupData ItemGroupOID="HIDDEN"/></Annotation>
<ItemGroupData ItemGroupOID="IG_1">
<ItemData ItemOID="I_1" Value="1"><OpenClinica:AuditLogs><OpenClinica:AuditLog ID="AL_7" DateTimeStamp="2021-01-02T00:00:00"/></OpenClinica:AuditLogs><OpenClinica:DiscrepancyNotes><OpenClinica:DiscrepancyNote ID="DN_1"><OpenClinica:ChildNote><OpenClinica:Description>x</OpenClinica:Description></OpenClinica:ChildNote></OpenClinica:DiscrepancyNote></OpenClinica:DiscrepancyNotes><ItemData ItemOID="HIDDEN" Value="nested"/></ItemData>
<Annotation><ItemData ItemOID="HIDDEN" Value="x"/></Annotation>
<OpenClinica:Extra><ItemData ItemOID="HIDDEN"/></OpenClinica:Extra>
</ItemGroupData>
<ItemData ItemOID="HIDDEN" Value="out of place"/>
</FormData>
</StudyEventData>
</SubjectData>
</ClinicalData>
<AdminData><User OID="U1"/></AdminData>
</ODM>"#
    );
    let (records, stats) = read(xml.as_bytes()).unwrap();
    assert_eq!(
        stats,
        Stats {
            subjects: 1,
            study_events: 1,
            forms: 1,
            item_groups: 1,
            items: 1,
            null_items: 0,
            audit_logs: 2,
        }
    );
    let [Record::Subject(s)] = &records[..] else {
        panic!("{records:?}")
    };
    assert_eq!(s.audit.max_id.as_deref(), Some("AL_7"));
    assert_eq!(
        s.audit.latest_timestamp.as_deref(),
        Some("2021-01-02T00:00:00")
    );
    assert_eq!(
        values(xml.as_bytes()),
        [("I_1".to_owned(), Some("1".to_owned()))]
    );
}

// ------------------------------------------------------------ XML prolog etc.

#[test]
fn bom_crlf_comments_processing_instructions_and_declarations_are_accepted() {
    let body = doc(r#"<!-- a comment --><?pi data?><ItemData ItemOID="I_1" Value="x"/><!---->"#);
    let want = values(body.as_bytes());
    let variants = [
        format!("\u{FEFF}{body}"),
        format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n{body}"),
        format!("\u{FEFF}<?xml version='1.0' encoding='utf-8' standalone='yes' ?>{body}"),
        format!("<?xml version=\"1.0\" encoding=\"US-ASCII\"?>{body}"),
        format!("<?xml version=\"1.0\" encoding=\"ascii\"?>{body}"),
        format!(
            "<?xml version=\"1.0\"?><!-- c --><?xml-stylesheet href=\"a\"?>\n\n{body}<!-- after --><?after?>\n\n"
        ),
        body.replace('\n', "\r\n"),
        body.replace('\n', "\r"),
        body.replace("<ItemData", "<!-- before item --><ItemData"),
        body.trim_end().to_owned(),
    ];
    for v in &variants {
        assert_eq!(values(v.as_bytes()), want, "{v:?}");
    }
}

#[test]
fn line_ends_are_counted_as_xml_normalises_them() {
    // LF, CRLF and a lone CR each end a line.
    check_err(
        "<ODM xmlns='http://www.cdisc.org/ns/odm/v1.3'>\n\r\n\r<a></b>",
        4,
        4,
        "expected </a>, found </b>",
    );
    check_err(
        "<ODM xmlns='http://www.cdisc.org/ns/odm/v1.3'\r\n  a='1'\r\n  b>",
        3,
        4,
        "expected '=' after the attribute name, found end of tag",
    );
}

// ------------------------------------------------------------------ errors

#[test]
fn doctypes_are_refused_never_expanded() {
    let bomb = r#"<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<ODM xmlns="http://www.cdisc.org/ns/odm/v1.3">&lol3;</ODM>"#;
    let message = "a DOCTYPE declaration is not accepted (entities are never expanded)";
    check_err(bomb, 2, 1, message);
    check_err(
        "<!DOCTYPE ODM SYSTEM \"file:///etc/passwd\"><ODM xmlns=\"http://www.cdisc.org/ns/odm/v1.3\"/>",
        1,
        1,
        message,
    );
    check_err(
        "<!DOCTYPE ODM [<!ENTITY x SYSTEM \"http://example.com/x\">]",
        1,
        1,
        message,
    );
    check_err(
        "<ODM xmlns=\"http://www.cdisc.org/ns/odm/v1.3\">\n  <!DOCTYPE x></ODM>",
        2,
        3,
        message,
    );
}

#[test]
fn references_must_be_predefined_or_legal_characters() {
    let unknown = "unknown entity reference: expected &lt; &gt; &amp; &apos; &quot; or a character reference (no DTD is read)";
    let line = 7; // doc() puts the item lines on line 7
    check_err(
        doc(r#"<ItemData ItemOID="I" Value="a&nbsp;b"/>"#),
        line,
        31,
        unknown,
    );
    check_err(
        doc(r#"<ItemData ItemOID="I" Value="&#0;"/>"#),
        line,
        30,
        "character U+0000 is not allowed in XML 1.0",
    );
    check_err(
        doc(r#"<ItemData ItemOID="I" Value="&#x1;"/>"#),
        line,
        30,
        "character U+0001 is not allowed in XML 1.0",
    );
    check_err(
        doc(r#"<ItemData ItemOID="I" Value="&#xFFFE;"/>"#),
        line,
        30,
        "character U+FFFE is not allowed in XML 1.0",
    );
    check_err(
        doc(r#"<ItemData ItemOID="I" Value="&#xD800;"/>"#),
        line,
        30,
        "character U+D800 is not allowed in XML 1.0",
    );
    check_err(
        doc(r#"<ItemData ItemOID="I" Value="&#12a;"/>"#),
        line,
        30,
        "malformed character reference: expected &#DIGITS; or &#xHEXDIGITS;",
    );
    check_err(
        doc(r#"<ItemData ItemOID="I" Value="AT&T"/>"#),
        line,
        32,
        "expected ';' ending the reference, found end of the attribute value",
    );
    check_err(doc("text &bogus; here"), line, 6, unknown);
    check_err(
        doc("&#0;"),
        line,
        1,
        "character U+0000 is not allowed in XML 1.0",
    );
    check_err(
        doc("a & b"),
        line,
        3,
        "expected ';' ending the reference, found '<', '&' or end of input",
    );
}

#[test]
fn literal_characters_must_be_legal_xml() {
    check_err(
        doc("<ItemData ItemOID=\"I\" Value=\"a\u{1}\"/>"),
        7,
        31,
        "character U+0001 is not allowed in XML 1.0",
    );
    check_err(
        doc("text \u{0}"),
        7,
        6,
        "character U+0000 is not allowed in XML 1.0",
    );
    check_err(
        doc("\u{FFFF}"),
        7,
        1,
        "character U+FFFF is not allowed in XML 1.0",
    );
    check_err(
        doc("x ]]> y"),
        7,
        3,
        "expected character data without ']]>', found ']]>'",
    );
}

#[test]
fn encodings_other_than_utf8_and_ascii_are_refused() {
    let body = doc(r#"<ItemData ItemOID="I" Value="x"/>"#);
    check_err(
        format!("<?xml version=\"1.0\" encoding=\"ISO-8859-1\"?>{body}"),
        1,
        31,
        "unsupported encoding \"ISO-8859-1\": expected UTF-8 or US-ASCII",
    );
    check_err(
        format!(
            "<?xml version=\"1.0\" encoding=\"US-ASCII\"?>\n{}",
            doc(r#"<ItemData ItemOID="I" Value="é"/>"#)
        ),
        8,
        30,
        "non-ASCII byte in a document that declares encoding US-ASCII",
    );
    let utf16: Vec<u8> = "\u{FEFF}<ODM/>"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    check_err(
        &utf16,
        1,
        1,
        "the document is UTF-16 encoded: expected UTF-8 or US-ASCII",
    );
    let utf16be: Vec<u8> = "<ODM/>".encode_utf16().flat_map(u16::to_be_bytes).collect();
    check_err(
        &utf16be,
        1,
        1,
        "the document is UTF-16 encoded: expected UTF-8 or US-ASCII",
    );
    check_err(
        format!("<?xml version=\"2.0\"?>{body}"),
        1,
        16,
        "expected XML version 1.0, found '2'",
    );
}

#[test]
fn invalid_utf8_is_reported_at_its_byte() {
    let mut xml = doc(r#"<ItemData ItemOID="I" Value="ab"/>"#).into_bytes();
    let at = xml.windows(2).position(|w| w == b"ab").unwrap();
    xml[at + 1] = 0xFF;
    check_err(
        &xml,
        7,
        31,
        "invalid UTF-8: expected a UTF-8 encoded document",
    );
    let mut xml = doc("text").into_bytes();
    let at = xml.windows(4).position(|w| w == b"text").unwrap();
    xml[at] = 0xC3; // a lead byte without its continuation
    check_err(
        &xml,
        7,
        1,
        "invalid UTF-8: expected a UTF-8 encoded document",
    );
    check_err(
        b"\xC3<ODM/>",
        1,
        1,
        "invalid UTF-8: expected a UTF-8 encoded document",
    );
}

#[test]
fn the_root_must_be_odm_1_3() {
    check_err(
        r#"<ODM xmlns="http://www.cdisc.org/ns/odm/v2.0" ODMVersion="2.0"/>"#,
        1,
        1,
        "expected root element ODM in namespace http://www.cdisc.org/ns/odm/v1.3, found ODM in namespace http://www.cdisc.org/ns/odm/v2.0",
    );
    check_err(
        "<ODM/>",
        1,
        1,
        "expected root element ODM in namespace http://www.cdisc.org/ns/odm/v1.3, found ODM in no namespace",
    );
    check_err(
        "\n<html xmlns=\"http://www.cdisc.org/ns/odm/v1.3\"/>",
        2,
        1,
        "expected root element ODM in namespace http://www.cdisc.org/ns/odm/v1.3, found html in namespace http://www.cdisc.org/ns/odm/v1.3",
    );
    check_err(
        r#"<ODM xmlns="http://www.cdisc.org/ns/odm/v1.3" ODMVersion="1.2"/>"#,
        1,
        59,
        "expected root element ODM in namespace http://www.cdisc.org/ns/odm/v1.3, found ODMVersion other than 1.3",
    );
    // Good: a minimal empty ODM document.
    assert_eq!(
        read(br#"<ODM xmlns="http://www.cdisc.org/ns/odm/v1.3" ODMVersion="1.3.2"/>"#).unwrap(),
        (vec![], Stats::default())
    );
}

#[test]
fn truncated_and_mismatched_documents_fail_with_what_was_expected() {
    let xml = doc(r#"<ItemData ItemOID="I" Value="x"/>"#);
    let cut = &xml[..xml.find("</FormData>").unwrap()];
    check_err(cut, 9, 1, "unexpected end of input: expected </FormData>");
    check_err(
        xml.replace("</FormData>", "</StudyEventData>"),
        9,
        1,
        "expected </FormData>, found </StudyEventData>",
    );
    check_err(
        &xml[..xml.find("Value=").unwrap() + 8],
        7,
        31,
        "unexpected end of input: expected '\"' closing the attribute value",
    );
    check_err(
        &xml[..xml.find("<ItemData").unwrap() + 3],
        7,
        4,
        "unexpected end of input: expected '>' closing the tag",
    );
    check_err(
        "",
        1,
        1,
        "unexpected end of input: expected the root element ODM",
    );
    check_err(
        "  \n ",
        2,
        2,
        "unexpected end of input: expected the root element ODM",
    );
    check_err(
        "<!-- x",
        1,
        7,
        "unexpected end of input: expected '-->' closing the comment",
    );
    check_err(
        format!("{ODM_OPEN}<![CDATA[x"),
        1,
        142,
        "unexpected end of input: expected ']]>' closing the CDATA section",
    );
    check_err(
        "<?pi x",
        1,
        7,
        "unexpected end of input: expected '?>' closing the processing instruction",
    );
    check_err(
        format!("{ODM_OPEN}</ODM></ODM>"),
        1,
        138,
        "expected end of document, found </ODM>",
    );
    check_err(
        format!("{ODM_OPEN}</ODM><ODM/>"),
        1,
        138,
        "expected end of document (one root element only), found <ODM>",
    );
    check_err(
        format!("{ODM_OPEN}</ODM>x"),
        1,
        138,
        "expected end of document (after the root element only comments and processing instructions), found text",
    );
    check_err(
        format!("x{ODM_OPEN}</ODM>"),
        1,
        1,
        "expected the root element ODM, found text",
    );
    check_err(
        format!("{ODM_OPEN}\n<!"),
        2,
        3,
        "unexpected end of input: expected '--' or '[CDATA[' after '<!'",
    );
    check_err(
        "\n</ODM>",
        2,
        1,
        "expected the root element ODM, found </ODM>",
    );
    check_err(
        format!("{ODM_OPEN}<a></a\n b>"),
        1,
        135,
        "expected </a>, found </a\n b>",
    );
    // Whitespace before the `>` of an end tag is allowed.
    assert!(read(format!("{ODM_OPEN}</ODM \n>").as_bytes()).is_ok());
}

#[test]
fn tag_syntax_is_checked() {
    let item = |attrs: &str| doc(&format!("<ItemData {attrs}/>"));
    check_err(
        item(r#"ItemOID="I" Value="a<b""#),
        7,
        31,
        "expected an attribute value without '<' (escape it as &lt;), found '<'",
    );
    check_err(
        item(r#"ItemOID="I"Value="x""#),
        7,
        22,
        "expected whitespace before the next attribute, found 'V'",
    );
    check_err(
        item(r#"ItemOID=I"#),
        7,
        19,
        "expected a quoted attribute value, found 'I'",
    );
    check_err(
        item(r#"ItemOID="I" Value"#),
        7,
        28,
        "expected '=' after the attribute name, found end of tag",
    );
    check_err(
        item(r#"ItemOID="I" ItemOID="J""#),
        7,
        23,
        "duplicate attribute ItemOID",
    );
    check_err(
        item(r#"ItemOID="I" xmlns:a="urn:x" xmlns:b="urn:x" a:v="1" b:v="2""#),
        7,
        63,
        "duplicate attribute b:v",
    );
    check_err(
        item(r#"ItemOID="I" q:v="1""#),
        7,
        23,
        "namespace prefix \"q\" is not declared",
    );
    check_err(
        doc("<q:ItemData ItemOID=\"I\"/>"),
        7,
        1,
        "namespace prefix \"q\" is not declared",
    );
    check_err(
        item(r#"ItemOID="I" xmlns:p="""#),
        7,
        23,
        "expected a namespace URI (a prefix cannot be bound to \"\"), found xmlns:p",
    );
    check_err(
        item(r#"ItemOID="I" 1a="x""#),
        7,
        23,
        "expected a name (a letter, '_' or ':' then letters, digits, '.', '-', '_'), found '1'",
    );
    check_err(
        doc("<1tem/>"),
        7,
        2,
        "expected a name (a letter, '_' or ':' then letters, digits, '.', '-', '_'), found '1'",
    );
    check_err(
        doc("< ItemData/>"),
        7,
        2,
        "expected a name (a letter, '_' or ':' then letters, digits, '.', '-', '_'), found end of tag",
    );
    check_err(
        doc("<a:b:c xmlns:a='u'/>"),
        7,
        5,
        "expected a qualified name (prefix:local, one colon), found ':'",
    );
    check_err(
        doc("<!-- a -- b -->"),
        7,
        8,
        "expected a comment without '--', found '--'",
    );
    check_err(
        doc("<!-- a --->"),
        7,
        8,
        "expected '-->' after a character other than '-', found '--->'",
    );
    check_err(
        doc("<?xml version='1.0'?>"),
        7,
        1,
        "expected the XML declaration only at the very start of the document, found '<?xml'",
    );
    check_err(
        " <?xml version='1.0'?><ODM/>",
        1,
        2,
        "expected the XML declaration only at the very start of the document, found '<?xml'",
    );
    check_err(
        doc("<?XML x?>"),
        7,
        3,
        "expected a processing instruction target other than 'xml', found 'xml'",
    );
    check_err(
        doc("<!x>"),
        7,
        1,
        "expected '<!--' or '<![CDATA[', found '<!'",
    );
    check_err(
        "<?xml version=\"1.0\" encoding=\"UTF-8\" bogus=\"1\"?><ODM/>",
        1,
        38,
        "expected only version, encoding and standalone in the XML declaration, found 'b'",
    );
    check_err(
        "<![CDATA[x]]><ODM/>",
        1,
        1,
        "expected the root element ODM, found a CDATA section",
    );
    check_err(
        "&amp;<ODM/>",
        1,
        1,
        "expected the root element ODM, found a reference",
    );
}

#[test]
fn odm_elements_need_their_key_attributes() {
    check_err(
        doc(r#"<ItemData Value="x"/>"#),
        7,
        1,
        "expected attribute ItemOID on ItemData",
    );
    check_err(
        format!(
            "{ODM_OPEN}\n<ClinicalData StudyOID=\"S\">\n  <SubjectData OpenClinica:StudySubjectID=\"x\"/>"
        ),
        3,
        3,
        "expected attribute SubjectKey on SubjectData",
    );
    check_err(
        format!("{ODM_OPEN}<ClinicalData/>"),
        1,
        132,
        "expected attribute StudyOID on ClinicalData",
    );
}

#[test]
fn nesting_and_token_size_are_bounded() {
    let deep = format!("{ODM_OPEN}{}", "<a>".repeat(odm::MAX_DEPTH + 5));
    check_err(
        &deep,
        1,
        132 + 3 * (odm::MAX_DEPTH as u64 - 1),
        &format!("elements nested more than {} deep", odm::MAX_DEPTH),
    );
    let err = odm::count(
        format!(
            "{ODM_OPEN}<x a=\"{}\"/></ODM>",
            "v".repeat(odm::MAX_TOKEN + 10)
        )
        .as_bytes(),
    )
    .unwrap_err();
    assert!(matches!(err, OdmError::TokenTooLarge { .. }), "{err}");
    assert_eq!(err.position().column, 132);
}

#[test]
fn errors_never_quote_values() {
    let secret = "PATIENT-NAME-SECRET";
    for xml in [
        doc(&format!(
            r#"<ItemData ItemOID="I" Value="{secret}&bogus;"/>"#
        )),
        doc(&format!(r#"<ItemData ItemOID="I" Value="{secret}<"/>"#)),
        doc(&format!(r#"<ItemData ItemOID="I" Value="{secret}"#)),
        doc(&format!("{secret} &{secret};")),
        doc(&format!(r#"<ItemData ItemOID="I" Value="{secret}&#0;"/>"#)),
    ] {
        let err = read(xml.as_bytes()).unwrap_err();
        assert!(!err.contains(secret), "{err}");
    }
}

#[test]
fn every_truncation_of_a_document_is_an_error() {
    let config = GeneratorConfig {
        subjects: 1,
        sites: 1,
        max_visit_repeats: 1,
        max_specimens: 1,
        ..GeneratorConfig::default()
    };
    let mut xml = Vec::new();
    generate::generate(&config, &mut xml).unwrap();
    // Keep it small: metadata is covered by the subject-less prefix cuts.
    let xml = String::from_utf8(xml).unwrap();
    let start = xml.find("  <ClinicalData").unwrap();
    let xml = format!("{ODM_OPEN}\n{}", &xml[start..]);
    let end = xml.rfind("</ODM>").unwrap() + "</ODM>".len();
    for cut in 0..xml.len() {
        let prefix = &xml.as_bytes()[..cut];
        let counted = odm::count(prefix);
        let recorded = sync_records(prefix);
        if cut < end {
            assert!(counted.is_err(), "cut at {cut} was accepted");
            assert!(recorded.is_err(), "cut at {cut} was accepted");
            let mut out = Vec::new();
            assert!(cli::dump(prefix, &mut out).is_err() && out.is_empty());
        } else {
            assert!(counted.is_ok() && recorded.is_ok(), "cut at {cut}");
        }
    }
}

#[test]
fn dump_writes_nothing_when_the_end_is_broken_even_after_spilling_to_disk() {
    let config = GeneratorConfig {
        subjects: 30,
        ..GeneratorConfig::default()
    };
    let mut xml = Vec::new();
    generate::generate(&config, &mut xml).unwrap();
    let mut full = Vec::new();
    cli::dump_spooled(&xml[..], &mut full, 1024).unwrap();
    let mut in_memory = Vec::new();
    cli::dump(&xml[..], &mut in_memory).unwrap();
    assert_eq!(full, in_memory);
    assert!(full.len() > 10 * 1024);
    let broken = &xml[..xml.len() - 8];
    let mut out = Vec::new();
    let err = cli::dump_spooled(broken, &mut out, 1024).unwrap_err();
    assert!(
        matches!(err, CliError::Odm(OdmError::UnexpectedEof { .. })),
        "{err}"
    );
    assert!(out.is_empty());
}

// ---------------------------------------------------------------- generator

#[test]
fn generated_documents_read_back_with_the_counts_the_generator_reports() {
    let configs = [
        GeneratorConfig::default(),
        GeneratorConfig {
            seed: 7,
            subjects: 25,
            sites: 3,
            null_rate: 0.3,
            oc4_dates: true,
            ..GeneratorConfig::default()
        },
        GeneratorConfig {
            seed: 9,
            subjects: 5,
            sites: 0,
            audit_logs: false,
            discrepancy_notes: false,
            include_metadata: false,
            ..GeneratorConfig::default()
        },
    ];
    for config in configs {
        let mut xml = Vec::new();
        let generated = generate::generate(&config, &mut xml).unwrap();
        assert_eq!(generated.bytes, xml.len() as u64);
        let (records, stats) = read(&xml).unwrap();
        assert_eq!(stats, generated.stats, "{config:?}");
        let subjects: Vec<_> = records
            .iter()
            .filter_map(|r| match r {
                Record::Subject(s) => Some(s),
                _ => None,
            })
            .collect();
        assert_eq!(subjects.len() as u64, generated.stats.subjects);
        let nulls = subjects
            .iter()
            .flat_map(|s| s.items())
            .filter(|(_, _, _, i)| i.value.is_none())
            .count();
        assert_eq!(nulls as u64, generated.stats.null_items);
        assert_eq!(
            records.iter().any(|r| matches!(r, Record::Study(_))),
            config.include_metadata
        );
        if config.audit_logs {
            assert!(subjects.iter().all(|s| s.audit.max_id_number.is_some()));
        }
        // Same seed, same bytes.
        let mut again = Vec::new();
        generate::generate(&config, &mut again).unwrap();
        assert_eq!(xml, again);
    }
}

#[test]
fn generated_quirks_survive_the_round_trip() {
    let config = GeneratorConfig {
        subjects: 60,
        ..GeneratorConfig::default()
    };
    let mut xml = Vec::new();
    generate::generate(&config, &mut xml).unwrap();
    let subjects = subjects(&xml);
    let values: std::collections::HashSet<_> = subjects
        .iter()
        .flat_map(|s| {
            s.items()
                .filter_map(|(_, _, _, i)| i.value.clone())
                .collect::<Vec<_>>()
        })
        .collect();
    for quirk in [
        "",
        "null",
        "Tom & Jerry <\"quoted\"> 'single'",
        "line one\nline two\ttabbed\r\nwindows",
        "  leading and trailing  ",
        "Größe – 175 cm ≥ normal",
        "1,2",
        "ml ",
    ] {
        assert!(values.contains(quirk), "missing {quirk:?}");
    }
    assert!(
        values
            .iter()
            .any(|v| v.ends_with(' ') && v.trim().parse::<u32>().is_ok())
    );
    assert!(
        values
            .iter()
            .any(|v| v.len() == 4 && v.parse::<u32>().is_ok())
    );
    assert!(
        subjects
            .iter()
            .any(|s| s.status.as_deref() == Some("removed"))
    );
    assert!(subjects.iter().any(|s| s.sex.as_deref() == Some("null")));
    assert!(
        subjects
            .iter()
            .flat_map(|s| &s.events)
            .flat_map(|e| &e.forms)
            .any(|f| f.status.as_deref() == Some("invalid"))
    );
    assert!(
        subjects
            .iter()
            .flat_map(|s| &s.events)
            .any(|e| e.repeat_key.as_deref() == Some("2"))
    );
    let sites: std::collections::BTreeSet<_> =
        subjects.iter().map(|s| s.study_oid.clone()).collect();
    assert_eq!(sites.len(), 2);
}

#[test]
fn generated_variants_read_the_same() {
    let base = GeneratorConfig {
        subjects: 8,
        ..GeneratorConfig::default()
    };
    let mut xml = Vec::new();
    generate::generate(&base, &mut xml).unwrap();
    let want = read(&xml).unwrap();
    for variant in [
        GeneratorConfig {
            odm_prefix: Some("odm".into()),
            ext_prefix: "oc".into(),
            ..base.clone()
        },
        GeneratorConfig {
            legacy_extension: true,
            ..base.clone()
        },
        GeneratorConfig {
            crlf: true,
            ..base.clone()
        },
    ] {
        let mut other = Vec::new();
        generate::generate(&variant, &mut other).unwrap();
        assert_ne!(xml, other);
        assert_eq!(read(&other).unwrap(), want, "{variant:?}");
    }
    // One subject alone reads as it does in the full document.
    let mut one = Vec::new();
    generate::generate(
        &GeneratorConfig {
            subject_range: Some(5..6),
            include_metadata: false,
            ..base.clone()
        },
        &mut one,
    )
    .unwrap();
    let alone = subjects(&one);
    assert_eq!(alone.len(), 1);
    assert_eq!(alone[0], subjects(&xml)[5]);
}

// ----------------------------------------------------------------- proptest

/// A small document with metadata, data, audit logs and references.
fn seed_document() -> Vec<u8> {
    let mut xml = b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n".to_vec();
    xml.extend_from_slice(
        doc(r#"<ItemData ItemOID="I_1" Value="a&amp;b&#10;"/>
<ItemData ItemOID="I_2" IsNull="Yes"><OpenClinica:AuditLogs><OpenClinica:AuditLog ID="AL_1"/></OpenClinica:AuditLogs></ItemData>
<!-- c --><?pi x?>"#)
        .as_bytes(),
    );
    xml
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, &'static str),
    Delete(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let snippets = prop::sample::select(vec![
        "<",
        "&",
        "]]>",
        ">",
        "\"",
        "'",
        "&#0;",
        "&bogus;",
        "\u{0}",
        "\u{FEFF}",
        "<!DOCTYPE x [<!ENTITY a 'b'>]>",
        "<![CDATA[",
        "<!--",
        "<?xml version='1.0'?>",
        "xmlns:OpenClinica='urn:x' ",
        "xmlns='urn:y' ",
        "<ItemData ItemOID='X'>",
        "</ItemData>",
        "<a><a><a><a><a><a><a><a><a><a><a><a><a><a><a><a>",
        "\r\n",
        "\u{2013}",
    ]);
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), snippets).prop_map(|(i, s)| Mutation::Insert(i, s)),
        (any::<usize>(), 0usize..20).prop_map(|(i, n)| Mutation::Delete(i, n)),
    ]
}

fn apply(mut xml: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = xml.len().max(1);
        match *m {
            Mutation::Flip(i, b) => {
                if !xml.is_empty() {
                    let i = i % xml.len();
                    xml[i] ^= b;
                }
            }
            Mutation::Truncate(i) => xml.truncate(i % len),
            Mutation::Insert(i, s) => {
                let i = i % (xml.len() + 1);
                xml.splice(i..i, s.bytes());
            }
            Mutation::Delete(i, n) => {
                let i = i % len;
                let end = (i + n).min(xml.len());
                if i < end {
                    xml.drain(i..end);
                }
            }
        }
    }
    xml
}

proptest! {
    // A fixed seed: CI explores the same 256 cases every time, so a red run
    // is a regression, never bad luck. Set PROPTEST_CASES (and change the
    // seed) to explore further locally.
    #![proptest_config(ProptestConfig {
        cases: 256,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x6f63_7379_6e63),
        ..ProptestConfig::default()
    })]

    /// Mutated documents never panic or hang, and every path agrees on
    /// acceptance, records and the exact error.
    #[test]
    fn mutated_documents_are_read_or_refused_consistently(
        mutations in prop::collection::vec(mutation(), 1..4)
    ) {
        let xml = apply(seed_document(), &mutations);
        let _ = read(&xml);
    }
}

#[test]
fn the_seed_document_of_the_property_test_is_valid() {
    let (_, stats) = read(&seed_document()).unwrap();
    assert_eq!((stats.items, stats.null_items, stats.audit_logs), (2, 1, 1));
}

#[test]
fn the_encoding_is_told_the_same_way_whatever_the_buffer_size() {
    // `read` insists that one-byte, seven-byte, large and async buffers
    // agree; a byte order mark split across reads once fooled the sniffing.
    for (doc, want) in [
        (
            &b"\xFF\xFE<\x00O\x00"[..],
            "line 1, column 1 (byte 0): the document is UTF-16",
        ),
        (
            &b"\xFE\xFF\x00<\x00O"[..],
            "line 1, column 1 (byte 0): the document is UTF-16",
        ),
        (
            &b"\xEF\xBB\xBF\xEF\xBB\xBF<ODM/>"[..],
            "a second byte order mark",
        ),
    ] {
        let err = read(doc).unwrap_err();
        assert!(err.contains(want), "{doc:?}: {err}");
    }
    let ok = b"\xEF\xBB\xBF<ODM xmlns=\"http://www.cdisc.org/ns/odm/v1.3\" ODMVersion=\"1.3\"/>";
    assert!(read(ok).is_ok(), "{:?}", read(ok));
}
