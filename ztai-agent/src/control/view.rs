//! What `ztai-agent flows` shows: a top-like table, or JSON for scripts.
use std::{cmp::Ordering, fmt::Write as _, net::SocketAddr};

use crate::flows::{FlowRecord, Snapshot};

const GAP: &str = "  ";

/// Busiest first; the tie-breaks keep the order stable between refreshes so
/// rows do not jump around when counters are equal.
fn by_traffic(a: &FlowRecord, b: &FlowRecord) -> Ordering {
    let bytes = |f: &FlowRecord| f.orig_bytes.saturating_add(f.reply_bytes);
    let packets = |f: &FlowRecord| f.orig_packets.saturating_add(f.reply_packets);
    bytes(b)
        .cmp(&bytes(a))
        .then_with(|| packets(b).cmp(&packets(a)))
        .then_with(|| a.src_segment.cmp(&b.src_segment))
        .then_with(|| a.dst_segment.cmp(&b.dst_segment))
        .then_with(|| a.dst_addr.cmp(&b.dst_addr))
        .then_with(|| a.dst_port.cmp(&b.dst_port))
        .then_with(|| a.proto.cmp(&b.proto))
        .then_with(|| a.verdict.cmp(&b.verdict))
}

/// The snapshot with its flows in table order.
fn sorted(snapshot: &Snapshot) -> Snapshot {
    let mut s = snapshot.clone();
    s.flows.sort_by(by_traffic);
    s
}

/// The snapshot as one JSON document, flows sorted like the table. It has
/// the same shape as the control protocol's answer, so scripts can parse
/// either with the same code.
pub fn render_json(snapshot: &Snapshot) -> String {
    // Plain structs with string keys: serde_json cannot fail on them.
    serde_json::to_string(&sorted(snapshot)).expect("Snapshot serializes to JSON")
}

/// The flow table for a terminal `width` columns wide, busiest flow first.
pub fn render_table(snapshot: &Snapshot, width: usize) -> String {
    let mut out = table_lines(snapshot, width, usize::MAX).join("\n");
    out.push('\n');
    out
}

/// `n` scaled by `step` until it shows as at most three digits and one
/// decimal; the 0.05 margin keeps rounding from printing "1024.0 KiB".
fn scaled(n: u64, step: f64, units: &[&str], sep: &str) -> String {
    let mut v = n as f64;
    for unit in units {
        v /= step;
        if v < step - 0.05 {
            return format!("{v:.1}{sep}{unit}");
        }
    }
    // Unreachable for u64 with the unit lists below; still a number.
    format!("{v:.1}{sep}{}", units.last().copied().unwrap_or(""))
}

/// Bytes in IEC units ("512 B", "1.5 KiB", "5.0 GiB").
fn human_bytes(n: u64) -> String {
    if n < 1024 {
        return format!("{n} B");
    }
    scaled(n, 1024.0, &["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"], " ")
}

/// Counts exact below 10 000 (where every digit is still readable), then SI.
fn human_count(n: u64) -> String {
    if n < 10_000 {
        return n.to_string();
    }
    scaled(n, 1000.0, &["k", "M", "G", "T", "P", "E"], "")
}

fn char_len(s: &str) -> usize {
    s.chars().count()
}

/// At most `w` characters; a cut is marked with "…" at the end.
pub(super) fn fit(s: &str, w: usize) -> String {
    if char_len(s) <= w {
        return s.to_string();
    }
    if w == 0 {
        return String::new();
    }
    let mut out: String = s.chars().take(w - 1).collect();
    out.push('…');
    out
}

/// Like [`fit`] but keeps the end: an address's port is its most useful part.
fn fit_tail(s: &str, w: usize) -> String {
    let len = char_len(s);
    if len <= w {
        return s.to_string();
    }
    if w == 0 {
        return String::new();
    }
    let mut out = String::from("…");
    out.extend(s.chars().skip(len - (w - 1)));
    out
}

#[derive(Clone, Copy, PartialEq)]
enum Align {
    Left,
    Right,
}

struct Column {
    title: &'static str,
    align: Align,
    /// Can be narrowed (with "…") when the terminal is too narrow.
    min: Option<usize>,
    /// Cut from the front instead of the back.
    keep_tail: bool,
}

const COLUMNS: [Column; 7] = [
    Column { title: "SRC", align: Align::Left, min: Some(6), keep_tail: false },
    Column { title: "DST", align: Align::Left, min: Some(6), keep_tail: false },
    Column { title: "ADDR:PORT", align: Align::Left, min: Some(10), keep_tail: true },
    Column { title: "PROTO", align: Align::Left, min: None, keep_tail: false },
    Column { title: "VERDICT", align: Align::Left, min: None, keep_tail: false },
    Column { title: "PKTS out/in", align: Align::Right, min: None, keep_tail: false },
    Column { title: "BYTES out/in", align: Align::Right, min: None, keep_tail: false },
];

/// "out/in" with both halves right-aligned across rows, so the slashes line up.
fn pairs(values: &[(String, String)]) -> Vec<String> {
    let wo = values.iter().map(|(o, _)| char_len(o)).max().unwrap_or(0);
    let wi = values.iter().map(|(_, i)| char_len(i)).max().unwrap_or(0);
    values.iter().map(|(o, i)| format!("{o:>wo$}/{i:>wi$}")).collect()
}

fn header(snapshot: &Snapshot) -> [String; 2] {
    let t = &snapshot.totals;
    let mut first = format!(
        "policy {}  generation {}  segments {}  labeled cgroups {}  flows {}",
        snapshot.policy_name,
        snapshot.generation,
        snapshot.segments.len(),
        snapshot.labeled_cgroups,
        snapshot.flows.len()
    );
    if !snapshot.ready {
        first.push_str("  (not ready: policy not applied yet)");
    }
    let mut second = format!(
        "allowed {}  denied {}  audited {}  events dropped {}  evictions {}",
        t.allowed, t.denied, t.audited, t.events_dropped, t.flow_table_evictions
    );
    // Only worth a glance when it happens: sockets went untracked.
    if t.socket_table_full > 0 {
        let _ = write!(second, "  socket table full {}", t.socket_table_full);
    }
    [first, second]
}

/// Narrows the flexible columns, widest first, until the row fits `width`.
fn shrink(widths: &mut [usize], width: usize) {
    let total = |w: &[usize]| w.iter().sum::<usize>() + GAP.len() * (w.len() - 1);
    while total(widths) > width {
        let widest = COLUMNS
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.min.filter(|m| widths[i] > *m).map(|_| i))
            .max_by_key(|i| widths[*i]);
        match widest {
            Some(i) => widths[i] -= 1,
            None => return, // the caller cuts the lines
        }
    }
}

/// The table as lines: two header lines, a blank line, the column titles,
/// then one line per flow. With more flows than `max_lines` allows, the
/// last line says how many were left out.
pub(super) fn table_lines(snapshot: &Snapshot, width: usize, max_lines: usize) -> Vec<String> {
    let [first, second] = header(snapshot);
    let mut lines = vec![first, second, String::new()];
    if snapshot.flows.is_empty() {
        lines.push("no flows yet".to_string());
    } else {
        let mut flows: Vec<&FlowRecord> = snapshot.flows.iter().collect();
        flows.sort_by(|a, b| by_traffic(a, b));
        let pkts = pairs(&flows.iter().map(|f| (human_count(f.orig_packets), human_count(f.reply_packets))).collect::<Vec<_>>());
        let bytes = pairs(&flows.iter().map(|f| (human_bytes(f.orig_bytes), human_bytes(f.reply_bytes))).collect::<Vec<_>>());
        let rows: Vec<[String; 7]> = flows
            .iter()
            .zip(pkts)
            .zip(bytes)
            .map(|((f, p), b)| {
                [
                    f.src_segment.clone(),
                    f.dst_segment.clone(),
                    SocketAddr::new(f.dst_addr, f.dst_port).to_string(),
                    f.proto.clone(),
                    f.verdict.clone(),
                    p,
                    b,
                ]
            })
            .collect();
        let mut widths: Vec<usize> = COLUMNS.iter().map(|c| char_len(c.title)).collect();
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(char_len(cell));
            }
        }
        shrink(&mut widths, width);
        let line = |cells: [&str; 7]| {
            let mut s = String::new();
            for (i, (cell, col)) in cells.iter().zip(&COLUMNS).enumerate() {
                let w = widths[i];
                let cell = if col.keep_tail { fit_tail(cell, w) } else { fit(cell, w) };
                if i > 0 {
                    s.push_str(GAP);
                }
                let _ = match col.align {
                    Align::Left => write!(s, "{cell:<w$}"),
                    Align::Right => write!(s, "{cell:>w$}"),
                };
            }
            s.trim_end().to_string()
        };
        lines.push(line(COLUMNS.map(|c| c.title)));
        for row in &rows {
            lines.push(line([&row[0], &row[1], &row[2], &row[3], &row[4], &row[5], &row[6]]));
        }
    }
    if lines.len() > max_lines {
        let keep = max_lines.saturating_sub(1).max(1);
        let hidden = lines.len() - keep;
        lines.truncate(keep);
        lines.push(format!("… {hidden} more flows (enlarge the window, or use --json)"));
    }
    lines.into_iter().map(|l| fit(&l, width)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::test_util::sample;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
        assert_eq!(human_count(9_999), "9999");
        assert_eq!(human_count(12_345), "12.3k");
        assert_eq!(human_count(53_687_092), "53.7M");
        assert_eq!(human_count(999_960), "1.0M");
        assert_eq!(human_bytes((1 << 20) - 10), "1.0 MiB");
        assert_eq!(human_count(u64::MAX), "18.4E");
    }

    #[test]
    fn table_is_sorted_by_total_bytes() {
        let table = render_table(&sample(), 200);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "policy lab  generation 3  segments 3  labeled cgroups 7  flows 4");
        assert_eq!(lines[1], "allowed 120  denied 4  audited 2  events dropped 1  evictions 5");
        assert_eq!(lines[2], "");
        let expected = [
            "SRC        DST       ADDR:PORT        PROTO  VERDICT  PKTS out/in     BYTES out/in",
            "training   vectordb  10.0.0.5:6333    tcp    allow    53.7M/   10  5.0 GiB/1.0 KiB",
            "inference  vectordb  10.0.0.5:6333    tcp    allow       21/15.7k  2.0 KiB/1.5 MiB",
            "inference  host      [::1]:8000       tcp    audit        4/    2    300 B/  200 B",
            "training   world     203.0.113.9:443  tcp    deny         1/    0      0 B/    0 B",
        ];
        assert_eq!(&lines[3..], &expected, "\n{table}");
    }

    #[test]
    fn table_fits_a_narrow_terminal() {
        // 10 columns short of the natural width: names and addresses give way.
        let table = render_table(&sample(), 72);
        let lines: Vec<&str> = table.lines().collect();
        for line in &lines {
            assert!(char_len(line) <= 72, "too wide: {line:?}");
        }
        assert!(lines[4].starts_with("train… "), "{table}");
        assert!(lines[7].contains(" …113.9:443 "), "{table}");
        // The byte column, the sort key, is intact.
        assert!(lines[4].ends_with("5.0 GiB/1.0 KiB"), "{table}");
        assert!(lines[7].ends_with("0 B/    0 B"), "{table}");

        // Too narrow for even the narrowed columns: lines are cut at the edge.
        for line in render_table(&sample(), 40).lines() {
            assert!(char_len(line) <= 40, "too wide: {line:?}");
        }
    }

    #[test]
    fn table_limits_lines() {
        let lines = table_lines(&sample(), 200, 6);
        assert_eq!(lines.len(), 6);
        assert!(lines[4].starts_with("training"));
        assert_eq!(lines[5], "… 3 more flows (enlarge the window, or use --json)");
    }

    #[test]
    fn table_says_when_empty_or_not_ready() {
        let snap = Snapshot { policy_name: "p".into(), ..Snapshot::default() };
        let table = render_table(&snap, 200);
        assert!(table.lines().next().is_some_and(|l| l.ends_with("(not ready: policy not applied yet)")), "{table}");
        assert!(table.contains("\nno flows yet\n"), "{table}");
    }

    #[test]
    fn json_round_trips_sorted() {
        let snap = sample();
        let json = render_json(&snap);
        assert!(!json.contains('\n'));
        let back: Snapshot = serde_json::from_str(&json).expect("valid JSON");
        let mut expected = snap.clone();
        expected.flows.sort_by(by_traffic);
        assert_eq!(back, expected);
        let order: Vec<u64> = back.flows.iter().map(FlowRecord::total_bytes).collect();
        assert!(order.windows(2).all(|w| w[0] >= w[1]), "{order:?}");
        assert_eq!(back.totals, snap.totals);
    }
}
