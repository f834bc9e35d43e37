//! `ward-proxy log verify`: the hash chain line by line, where the file begins and ends, and
//! the signed anchors. What is caught:
//! - an edited, removed or inserted line (the next line's `prev` or the sequence disagrees);
//! - removed first records (a file begins at a `start` or `rotate` anchor, nothing else);
//! - a forged append after a clean close (only a `restart` anchor may follow a `close`);
//! - a cut end, a forged append or a rewritten suffix: the lines after the last signed anchor
//!   are reported as unproven, and an anchor whose signature does not match what it covers is
//!   an error (without the proxy's key the chain cannot be re-signed);
//! - with a bundle: an anchor signed by a key the trust domain never certified.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use super::anchor::{self, Trust};
use super::file::{Line, hash};

/// The result of verifying a log file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Lines read.
    pub lines: u64,
    /// Records the proxy reported as dropped (not tampering).
    pub dropped: u64,
    /// The hash the first line says precedes it (the previous file's last line).
    pub starts_after: Option<String>,
    /// Hash of the last line (to compare with the next file's anchor).
    pub last_hash: Option<String>,
    /// Anchors whose signature verified (and, with a bundle, whose signer it trusts).
    pub signed_anchors: u64,
    /// The SPIFFE IDs that signed them.
    pub signers: Vec<String>,
    /// Lines after the last signed anchor: nothing vouches for them (the proxy is still
    /// writing, stopped without closing, or the end was cut or replaced).
    pub unproven: u64,
    /// The file ends with a signed `close` anchor.
    pub closed: bool,
    /// Whether anchor signers were checked against a trust bundle.
    pub bundle_checked: bool,
    /// The first problem: (1-based line number, description).
    pub broken: Option<(u64, String)>,
}

/// Verifies one file's chain and anchors; anchor signers are checked against `trust` when
/// given.
pub fn verify_with(path: &Path, trust: Option<&Trust>) -> std::io::Result<Report> {
    verify_lines(BufReader::new(File::open(path)?), trust)
}

/// [`verify_with`] on the lines `r` holds (a file's contents).
pub fn verify_lines(r: impl BufRead, trust: Option<&Trust>) -> std::io::Result<Report> {
    let mut report = Report {
        lines: 0,
        dropped: 0,
        starts_after: None,
        last_hash: None,
        signed_anchors: 0,
        signers: Vec::new(),
        unproven: 0,
        closed: false,
        bundle_checked: trust.is_some(),
        broken: None,
    };
    let mut prev: Option<(u64, String)> = None;
    let mut after_close = false;
    for (i, line) in r.lines().enumerate() {
        let n = i as u64 + 1;
        let text = line?;
        report.lines = n;
        if let Err(why) = check_line(&text, &mut prev, &mut after_close, trust, &mut report) {
            report.broken = Some((n, why));
            return Ok(report);
        }
    }
    if report.lines == 0 {
        report.broken = Some((
            0,
            "the file is empty: it has not even its start anchor".into(),
        ));
    }
    Ok(report)
}

/// Verifies one file's chain and the signatures of its anchors (without a bundle).
pub fn verify(path: &Path) -> std::io::Result<Report> {
    verify_with(path, None)
}

fn check_line(
    text: &str,
    prev: &mut Option<(u64, String)>,
    after_close: &mut bool,
    trust: Option<&Trust>,
    report: &mut Report,
) -> Result<(), String> {
    let line: Line = serde_json::from_str(text).map_err(|e| format!("not a log record: {e}"))?;
    let reason = line.anchor_reason();
    match prev {
        None => {
            report.starts_after = Some(line.prev.clone());
            match reason {
                Some("start") if line.seq == 0 && line.prev == super::file::ZERO => {}
                Some("rotate") => {}
                _ => {
                    return Err("the file does not begin at its start or rotation anchor: \
                         records were removed from its beginning"
                        .into());
                }
            }
        }
        Some((seq, h)) => {
            if line.seq != *seq + 1 {
                return Err(format!(
                    "sequence jumps from {seq} to {}: records missing",
                    line.seq
                ));
            }
            if line.prev != *h {
                return Err(
                    "hash chain broken: the previous line was altered, removed or inserted".into(),
                );
            }
            if *after_close && reason != Some("restart") {
                return Err(
                    "a record follows the clean close without a restart anchor: appended".into(),
                );
            }
        }
    }
    report.dropped += line.dropped;
    *after_close = reason == Some("close");
    report.closed = false;
    report.unproven += 1;
    if reason.is_some() && line.sig.is_some() {
        let signer = anchor::check(&line, trust)?;
        report.signed_anchors += 1;
        report.unproven = 0;
        report.closed = reason == Some("close");
        let s = signer.to_string();
        if !report.signers.contains(&s) {
            report.signers.push(s);
        }
    }
    let h = hash(text);
    report.last_hash = Some(h.clone());
    *prev = Some((line.seq, h));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access_log::file::Writer;
    use crate::access_log::test_entry;
    use std::io::Write as _;
    use ward_testing::Pki;

    fn trust(pki: &Pki) -> Trust {
        Trust {
            roots: vec![pki.root_der().to_vec().into()],
        }
    }

    /// A closed log signed by `spiffe://td/proxy`: start, 4 records, an anchor, 4 records, close.
    fn signed_log(dir: &Path, pki: &Pki) -> std::path::PathBuf {
        let issued = pki.svid("/proxy");
        let svid = ward_net::Svid::from_parts(issued.chain_der, issued.key_der).unwrap();
        let p = dir.join("a.jsonl");
        let mut w = Writer::open(&p, 1 << 30, Box::new(move || Some(svid.clone()))).unwrap();
        for i in 0..4 {
            w.write(test_entry(i), 0).unwrap();
        }
        w.anchor("interval", None).unwrap();
        for i in 4..8 {
            w.write(test_entry(i), 0).unwrap();
        }
        w.anchor("close", None).unwrap();
        w.file.flush().unwrap();
        p
    }

    fn lines(p: &Path) -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn put(p: &Path, lines: &[String]) {
        let mut f = File::create(p).unwrap();
        for l in lines {
            writeln!(f, "{l}").unwrap();
        }
    }

    /// Re-links `lines` from index `from` on: what someone without the key can do to make a
    /// rewritten suffix chain again.
    fn rechain(lines: &mut [String], from: usize) {
        for i in from..lines.len() {
            let mut l: Line = serde_json::from_str(&lines[i]).unwrap();
            l.seq = if i == 0 {
                0
            } else {
                serde_json::from_str::<Line>(&lines[i - 1]).unwrap().seq + 1
            };
            l.prev = if i == 0 {
                super::super::file::ZERO.to_owned()
            } else {
                hash(&lines[i - 1])
            };
            lines[i] = serde_json::to_string(&l).unwrap();
        }
    }

    #[test]
    fn a_signed_closed_log_is_proven_to_its_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new("td");
        let p = signed_log(dir.path(), &pki);
        let r = verify_with(&p, Some(&trust(&pki))).unwrap();
        assert_eq!(r.broken, None);
        assert_eq!((r.lines, r.signed_anchors, r.unproven), (11, 3, 0));
        assert!(r.closed && r.bundle_checked);
        assert_eq!(r.signers, vec!["spiffe://td/proxy".to_owned()]);
    }

    #[test]
    fn cutting_either_end_appending_or_rewriting_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new("td");
        let p = signed_log(dir.path(), &pki);
        let t = trust(&pki);
        let orig = lines(&p);

        // The first records removed: the file no longer begins at its start anchor.
        put(&p, &orig[3..]);
        let r = verify_with(&p, Some(&t)).unwrap();
        let (n, why) = r.broken.unwrap();
        assert_eq!(n, 1);
        assert!(why.contains("removed from its beginning"), "{why}");
        // ... even when re-chained from zero (the start anchor is signed, a new one is not).
        let mut v = orig[1..].to_vec();
        rechain(&mut v, 0);
        put(&p, &v);
        assert!(verify_with(&p, Some(&t)).unwrap().broken.is_some());

        // The last line (the close anchor) removed: not closed, four records unproven.
        put(&p, &orig[..orig.len() - 1]);
        let r = verify_with(&p, Some(&t)).unwrap();
        assert_eq!(r.broken, None);
        assert!(!r.closed);
        assert_eq!(r.unproven, 4);

        // A forged record appended after the close.
        let mut v = orig.clone();
        v.push(v[2].clone());
        rechain(&mut v, orig.len());
        put(&p, &v);
        let (n, why) = verify_with(&p, Some(&t)).unwrap().broken.unwrap();
        assert_eq!(n, 12);
        assert!(why.contains("follows the clean close"), "{why}");

        // A suffix rewritten with a recomputed chain: the close anchor's signature no longer
        // covers what precedes it.
        let mut v = orig.clone();
        v[7] = v[7].replace("\"status\":200", "\"status\":403");
        rechain(&mut v, 8);
        put(&p, &v);
        let (n, why) = verify_with(&p, Some(&t)).unwrap().broken.unwrap();
        assert_eq!(n, 11);
        assert!(why.contains("signature"), "{why}");
        // ... and with the signed close dropped, the rewritten records are unproven.
        v.pop();
        put(&p, &v);
        let r = verify_with(&p, Some(&t)).unwrap();
        assert_eq!(r.broken, None);
        assert_eq!((r.unproven, r.closed), (4, false));

        // Signed by a key the bundle never certified.
        put(&p, &orig);
        let other = trust(&Pki::new("td"));
        let (n, why) = verify_with(&p, Some(&other)).unwrap().broken.unwrap();
        assert_eq!(n, 1);
        assert!(why.contains("not trusted by the bundle"), "{why}");
    }
}
