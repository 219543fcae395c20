//! `COPY … FROM STDIN` (text format) for subjects the CP has never seen.
//!
//! A subject with no row in `participants` for the CP has nothing to
//! compare against, nothing to flag vanished (its other tables are empty
//! for it: this sink writes a subject's rows together) and nothing to
//! update, so its rows go in by `COPY`, PostgreSQL's fastest way in, and
//! all count as `created`. Should that assumption fail (rows left behind
//! by hand after their participant was deleted), `COPY` meets the primary
//! key, fails with a unique violation, and the caller writes the batch
//! again through the upsert path, which handles anything.

use sqlx::PgConnection;

use super::super::plan::SubjectPlan;
use super::super::{Counts, EntityCounts};
use super::{WriteFailure, json};
use crate::mapping::{FormRecord, ParticipantRecord, SpecimenRecord, VisitRecord};

/// Rows in COPY's text format: tab-separated, `\N` for NULL, backslash
/// escapes for backslash, tab, newline and carriage return.
#[derive(Default)]
struct Rows {
    buf: Vec<u8>,
    count: u64,
}

impl Rows {
    fn text(&mut self, value: &str) {
        let bytes = value.as_bytes();
        if !bytes
            .iter()
            .any(|b| matches!(b, b'\\' | b'\t' | b'\n' | b'\r'))
        {
            self.buf.extend_from_slice(bytes);
            return;
        }
        for &b in bytes {
            match b {
                b'\\' => self.buf.extend_from_slice(b"\\\\"),
                b'\t' => self.buf.extend_from_slice(b"\\t"),
                b'\n' => self.buf.extend_from_slice(b"\\n"),
                b'\r' => self.buf.extend_from_slice(b"\\r"),
                _ => self.buf.push(b),
            }
        }
    }

    fn opt(&mut self, value: Option<&str>) {
        match value {
            Some(v) => self.text(v),
            None => self.buf.extend_from_slice(b"\\N"),
        }
    }

    /// One row: the CP first, then `fields` (each `Some` text or NULL).
    fn row<'v>(&mut self, cp: &str, fields: impl IntoIterator<Item = Option<&'v str>>) {
        self.text(cp);
        for f in fields {
            self.buf.push(b'\t');
            self.opt(f);
        }
        self.buf.push(b'\n');
        self.count += 1;
    }
}

const PARTICIPANTS: &str = "COPY ocsync_data.participants (cp_id, subject_key, ppid, study_oid, \
    site, uid, birth_date, gender, registration_date, oc_status, status, fields) FROM STDIN";
const VISITS: &str = "COPY ocsync_data.visits (cp_id, subject_key, event_oid, event_repeat_key, \
    event_label, name, visit_date, end_date, site, oc_status, status) FROM STDIN";
const SPECIMENS: &str = "COPY ocsync_data.specimens (cp_id, subject_key, event_oid, \
    event_repeat_key, crf_oid, item_group_oid, item_group_repeat_key, label, specimen_type, \
    quantity, collection_time, fields, status) FROM STDIN";
const FORM_RECORDS: &str = "COPY ocsync_data.form_records (cp_id, subject_key, event_oid, \
    event_repeat_key, crf_oid, item_group_oid, item_group_repeat_key, form_oid, form_version, \
    form_status, status, values, item_names) FROM STDIN";

/// The four tables' rows in COPY text format, with the columns the sink
/// writes (the timestamps take their defaults). The sink copies new
/// subjects with it; `make bench` times a bare `COPY` of its output.
#[derive(Default)]
pub struct CopyRows {
    participants: Rows,
    visits: Rows,
    specimens: Rows,
    form_records: Rows,
}

impl CopyRows {
    /// Adds one subject's records.
    pub fn add<'r>(
        &mut self,
        cp: &str,
        p: &ParticipantRecord,
        visits: impl IntoIterator<Item = &'r VisitRecord>,
        specimens: impl IntoIterator<Item = &'r SpecimenRecord>,
        form_records: impl IntoIterator<Item = &'r FormRecord>,
    ) {
        let fields = json(&p.fields);
        self.participants.row(
            cp,
            [
                Some(p.subject_key.as_str()),
                Some(&p.ppid),
                Some(&p.study_oid),
                p.site.as_deref(),
                p.uid.as_deref(),
                p.birth_date.as_deref(),
                p.gender.as_deref(),
                p.registration_date.as_deref(),
                p.oc_status.as_deref(),
                Some(p.status.as_str()),
                Some(&fields),
            ],
        );
        for v in visits {
            self.visits.row(
                cp,
                [
                    Some(v.subject_key.as_str()),
                    Some(&v.event_oid),
                    Some(&v.event_repeat_key),
                    Some(&v.event_label),
                    Some(&v.name),
                    v.visit_date.as_deref(),
                    v.end_date.as_deref(),
                    v.site.as_deref(),
                    v.oc_status.as_deref(),
                    Some(v.status.as_str()),
                ],
            );
        }
        for x in specimens {
            let fields = json(&x.fields);
            self.specimens.row(
                cp,
                [
                    Some(x.subject_key.as_str()),
                    Some(&x.event_oid),
                    Some(&x.event_repeat_key),
                    Some(&x.crf_oid),
                    Some(&x.item_group_oid),
                    Some(&x.item_group_repeat_key),
                    x.label.as_deref(),
                    x.specimen_type.as_deref(),
                    x.quantity.as_deref(),
                    x.collection_time.as_deref(),
                    Some(&fields),
                    Some(x.status.as_str()),
                ],
            );
        }
        for f in form_records {
            let (values, names) = (json(&f.values), json(&f.item_names));
            self.form_records.row(
                cp,
                [
                    Some(f.subject_key.as_str()),
                    Some(&f.event_oid),
                    Some(&f.event_repeat_key),
                    Some(&f.crf_oid),
                    Some(&f.item_group_oid),
                    Some(&f.item_group_repeat_key),
                    Some(&f.form_oid),
                    f.form_version.as_deref(),
                    f.form_status.as_deref(),
                    Some(f.status.as_str()),
                    Some(&values),
                    Some(&names),
                ],
            );
        }
    }

    /// Every row counted as created.
    pub fn counts(&self) -> Counts {
        let created = |rows: &Rows| EntityCounts {
            created: rows.count,
            ..EntityCounts::default()
        };
        Counts {
            participants: created(&self.participants),
            visits: created(&self.visits),
            specimens: created(&self.specimens),
            form_records: created(&self.form_records),
        }
    }

    /// `(table, COPY … FROM STDIN statement, rows)` per table, in the
    /// order the tables are written.
    pub fn into_statements(self) -> [(&'static str, &'static str, Vec<u8>); 4] {
        [
            ("participants", PARTICIPANTS, self.participants.buf),
            ("visits", VISITS, self.visits.buf),
            ("specimens", SPECIMENS, self.specimens.buf),
            ("form_records", FORM_RECORDS, self.form_records.buf),
        ]
    }
}

/// Copies every record of `subjects` (all new to the CP) into the four
/// tables; every row counts as created.
pub(super) async fn copy_new(
    tx: &mut PgConnection,
    cp: &str,
    subjects: &[&SubjectPlan<'_>],
) -> Result<Counts, WriteFailure> {
    let mut rows = CopyRows::default();
    for s in subjects {
        rows.add(
            cp,
            s.participant,
            s.visits.iter().copied(),
            s.specimens.iter().copied(),
            s.form_records.iter().copied(),
        );
    }
    let counts = rows.counts();
    for (table, statement, buf) in rows.into_statements() {
        copy(tx, table, statement, buf).await?;
    }
    Ok(counts)
}

async fn copy(
    tx: &mut PgConnection,
    table: &'static str,
    statement: &'static str,
    buf: Vec<u8>,
) -> Result<(), WriteFailure> {
    if buf.is_empty() {
        return Ok(());
    }
    let failed = |error| WriteFailure { table, error };
    let mut copy = tx.copy_in_raw(statement).await.map_err(failed)?;
    let sent = copy.send(buf).await.map(|_| ());
    if let Err(e) = sent {
        // Leave the connection usable: end the COPY before reporting.
        let _ = copy.abort("ocsync: sending rows failed").await;
        return Err(failed(e));
    }
    copy.finish().await.map_err(failed)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Rows;

    #[test]
    fn text_format_escapes_what_copy_reads_specially() {
        let mut r = Rows::default();
        r.row("CP", [Some("a\tb\nc\rd\\e"), None, Some(""), Some("\\N")]);
        assert_eq!(
            String::from_utf8(r.buf).unwrap(),
            "CP\ta\\tb\\nc\\rd\\\\e\t\\N\t\t\\\\N\n"
        );
        assert_eq!(r.count, 1);
    }
}
