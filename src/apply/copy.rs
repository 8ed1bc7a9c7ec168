//! Bulk rows for `COPY … FROM STDIN`: backfill chunks travel from the source SELECT to the
//! target as already-encoded COPY rows, so no value is parsed or re-allocated on the way.
//!
//! Invariants:
//! - Binary format is used only when every column's type is built in (OID below 16384): the
//!   binary form of such a type is the same on every cluster, whereas user-defined types
//!   (and arrays or records of them) embed cluster-local OIDs. Everything else is text.
//! - Text format escapes every separator (backslash, tab, newline, carriage return), so any
//!   value round-trips; NULL is `\N`.
//! - A [`RowBuffer`] knows where each row ends, so rows can be dropped (changed inside their
//!   chunk's window) without re-encoding the rest.
//! - The COPY must report exactly the number of rows sent; anything else is a divergence.

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::SinkExt;

use super::ApplyError;
use crate::cluster::ClusterError;
use crate::sql::{quote_ident, CopyFormat, QualifiedName};

/// PostgreSQL's first OID for user-defined objects.
const BINARY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// Rows to insert with one COPY.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyRows {
    pub table: QualifiedName,
    pub columns: Vec<String>,
    pub format: CopyFormat,
    /// The rows, encoded in `format`, concatenated (no header or trailer).
    pub data: Bytes,
    pub rows: u64,
}

impl CopyRows {
    /// Rows given as text values (NULL as `None`).
    pub fn from_text(
        table: QualifiedName,
        columns: Vec<String>,
        rows: &[Vec<Option<String>>],
    ) -> CopyRows {
        let mut buf = RowBuffer::new(CopyFormat::Text);
        for r in rows {
            buf.push_text(r.iter().map(|v| v.as_deref().map(str::as_bytes)));
        }
        let n = buf.len();
        CopyRows {
            table,
            columns,
            format: CopyFormat::Text,
            data: buf.all(),
            rows: n as u64,
        }
    }
}

/// Encoded rows with their boundaries.
#[derive(Clone, Debug)]
pub struct RowBuffer {
    format: CopyFormat,
    data: BytesMut,
    ends: Vec<usize>,
}

impl RowBuffer {
    pub fn new(format: CopyFormat) -> RowBuffer {
        RowBuffer {
            format,
            data: BytesMut::new(),
            ends: Vec::new(),
        }
    }

    pub fn format(&self) -> CopyFormat {
        self.format
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Appends a row of text values (in text format) or of binary values (binary format):
    /// the values are the bytes PostgreSQL sent for each column.
    pub fn push<'a>(&mut self, values: impl ExactSizeIterator<Item = Option<&'a [u8]>>) {
        match self.format {
            CopyFormat::Text => self.push_text(values),
            CopyFormat::Binary => {
                self.data.put_i16(values.len() as i16);
                for v in values {
                    match v {
                        None => self.data.put_i32(-1),
                        Some(b) => {
                            self.data.put_i32(b.len() as i32);
                            self.data.extend_from_slice(b);
                        }
                    }
                }
                self.ends.push(self.data.len());
            }
        }
    }

    /// Appends a whole binary row as it came (field count, then each field).
    pub fn push_binary_row(&mut self, row: &[u8]) {
        debug_assert_eq!(self.format, CopyFormat::Binary);
        self.data.extend_from_slice(row);
        self.ends.push(self.data.len());
    }

    fn push_text<'a>(&mut self, values: impl Iterator<Item = Option<&'a [u8]>>) {
        for (i, v) in values.enumerate() {
            if i > 0 {
                self.data.put_u8(b'\t');
            }
            match v {
                None => self.data.extend_from_slice(b"\\N"),
                Some(text) => {
                    let mut start = 0;
                    for (at, &b) in text.iter().enumerate() {
                        let escaped: &[u8] = match b {
                            b'\\' => b"\\\\",
                            b'\t' => b"\\t",
                            b'\n' => b"\\n",
                            b'\r' => b"\\r",
                            _ => continue,
                        };
                        self.data.extend_from_slice(&text[start..at]);
                        self.data.extend_from_slice(escaped);
                        start = at + 1;
                    }
                    self.data.extend_from_slice(&text[start..]);
                }
            }
        }
        self.data.put_u8(b'\n');
        self.ends.push(self.data.len());
    }

    /// Every row, as one buffer.
    pub fn all(self) -> Bytes {
        self.data.freeze()
    }

    /// The rows at these positions (ascending), as one buffer: the whole buffer, uncopied,
    /// when every row is kept.
    pub fn select(self, picked: &[usize]) -> Bytes {
        if picked.len() == self.ends.len() {
            return self.data.freeze();
        }
        let mut out = BytesMut::new();
        for &i in picked {
            let start = if i == 0 { 0 } else { self.ends[i - 1] };
            if let Some(&end) = self.ends.get(i) {
                out.extend_from_slice(&self.data[start..end]);
            }
        }
        out.freeze()
    }
}

/// Malformed binary COPY data.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("binary COPY data: {0}")]
pub struct CopyDataError(pub String);

/// Splits binary COPY output (`COPY … TO STDOUT (FORMAT binary)`) into rows as it arrives,
/// whatever the message boundaries.
#[derive(Debug, Default)]
pub struct BinaryRowSplitter {
    buf: BytesMut,
    header: bool,
    done: bool,
}

impl BinaryRowSplitter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete row (from its field count to its last byte), with the byte range
    /// of each field's value (`None` for NULL) in `fields`; `None` when more data is needed
    /// or the trailer was read.
    pub fn next_row(
        &mut self,
        fields: &mut Vec<Option<std::ops::Range<usize>>>,
    ) -> Result<Option<Bytes>, CopyDataError> {
        if self.done {
            return if self.buf.is_empty() {
                Ok(None)
            } else {
                Err(CopyDataError("data after the trailer".into()))
            };
        }
        if !self.header {
            if self.buf.len() < BINARY_HEADER.len() {
                return Ok(None);
            }
            if self.buf[..11] != BINARY_HEADER[..11] {
                return Err(CopyDataError("no binary COPY signature".into()));
            }
            let ext = u32::from_be_bytes([self.buf[15], self.buf[16], self.buf[17], self.buf[18]])
                as usize;
            if self.buf.len() < BINARY_HEADER.len() + ext {
                return Ok(None);
            }
            let _ = self.buf.split_to(BINARY_HEADER.len() + ext);
            self.header = true;
        }
        if self.buf.len() < 2 {
            return Ok(None);
        }
        let count = i16::from_be_bytes([self.buf[0], self.buf[1]]);
        if count == -1 {
            let _ = self.buf.split_to(2);
            self.done = true;
            return if self.buf.is_empty() {
                Ok(None)
            } else {
                Err(CopyDataError("data after the trailer".into()))
            };
        }
        let count =
            usize::try_from(count).map_err(|_| CopyDataError(format!("field count {count}")))?;
        fields.clear();
        let mut at = 2;
        for _ in 0..count {
            let Some(len) = self.buf.get(at..at + 4) else {
                return Ok(None);
            };
            let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
            at += 4;
            if len == -1 {
                fields.push(None);
                continue;
            }
            let len =
                usize::try_from(len).map_err(|_| CopyDataError(format!("field length {len}")))?;
            if self.buf.len() < at + len {
                return Ok(None);
            }
            fields.push(Some(at..at + len));
            at += len;
        }
        Ok(Some(self.buf.split_to(at).freeze()))
    }

    /// Checks that the data ended with the trailer.
    pub fn finish(&self) -> Result<(), CopyDataError> {
        if self.done && self.buf.is_empty() {
            Ok(())
        } else {
            Err(CopyDataError("the data ended before the trailer".into()))
        }
    }
}

/// Runs one COPY on `tx`, inside the transaction the caller opened, for `parts`, which are
/// rows for the same table, columns and format (consecutive chunks are sent as one
/// statement).
pub async fn copy(tx: &tokio_postgres::Client, parts: &[&CopyRows]) -> Result<(), ApplyError> {
    let Some(first) = parts.first() else {
        return Ok(());
    };
    let expected: u64 = parts.iter().map(|p| p.rows).sum();
    if expected == 0 {
        return Ok(());
    }
    let cols = first
        .columns
        .iter()
        .map(|c| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ");
    let format = match first.format {
        CopyFormat::Text => "",
        CopyFormat::Binary => " (FORMAT binary)",
    };
    let sql = format!("COPY {} ({cols}) FROM STDIN{format}", first.table.quoted());
    let sink = tx
        .copy_in::<_, Bytes>(&sql)
        .await
        .map_err(ClusterError::sql(format!("starting {sql}")))?;
    futures_util::pin_mut!(sink);
    let send_err = || ClusterError::sql(format!("sending rows for {sql}"));
    if first.format == CopyFormat::Binary {
        sink.send(Bytes::from_static(BINARY_HEADER))
            .await
            .map_err(send_err())?;
    }
    for part in parts {
        // Large writes: the rows are already one buffer; slicing it copies nothing.
        let mut at = 0;
        while at < part.data.len() {
            let end = (at + (1 << 20)).min(part.data.len());
            sink.send(part.data.slice(at..end))
                .await
                .map_err(send_err())?;
            at = end;
        }
    }
    if first.format == CopyFormat::Binary {
        sink.send(Bytes::from_static(b"\xff\xff"))
            .await
            .map_err(send_err())?;
    }
    let n = sink
        .finish()
        .await
        .map_err(ClusterError::sql(format!("finishing {sql}")))?;
    if n != expected {
        return Err(ApplyError::Divergence {
            sql,
            expected,
            actual: n,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_every_separator() {
        let rows = CopyRows::from_text(
            QualifiedName::parse("a.b").unwrap(),
            vec!["x".into(), "y".into()],
            &[
                vec![Some("plain".into()), None],
                vec![Some("tab\there\nnew\\back\rcr".into()), Some("\\N".into())],
            ],
        );
        assert_eq!(
            String::from_utf8(rows.data.to_vec()).unwrap(),
            "plain\t\\N\ntab\\there\\nnew\\\\back\\rcr\t\\\\N\n"
        );
        assert_eq!(rows.rows, 2);
    }

    #[test]
    fn binary_rows_carry_field_count_lengths_and_null_markers() {
        let mut buf = RowBuffer::new(CopyFormat::Binary);
        buf.push([Some(&[0u8, 0, 0, 7][..]), None].into_iter());
        assert_eq!(
            buf.all().to_vec(),
            vec![0, 2, 0, 0, 0, 4, 0, 0, 0, 7, 0xff, 0xff, 0xff, 0xff]
        );
    }

    #[test]
    fn selecting_rows_keeps_exactly_those_rows_in_order() {
        let mut buf = RowBuffer::new(CopyFormat::Text);
        for v in ["a", "b", "c", "d"] {
            buf.push([Some(v.as_bytes())].into_iter());
        }
        assert_eq!(
            buf.clone().select(&[0, 2, 3]).to_vec(),
            b"a\nc\nd\n".to_vec()
        );
        assert_eq!(buf.clone().select(&[]).to_vec(), b"".to_vec());
        assert_eq!(buf.select(&[0, 1, 2, 3]).to_vec(), b"a\nb\nc\nd\n".to_vec());
    }

    #[test]
    fn binary_rows_split_at_any_message_boundary() {
        let mut data = BINARY_HEADER.to_vec();
        let mut rows = RowBuffer::new(CopyFormat::Binary);
        rows.push([Some(&b"k1"[..]), Some(&[0u8, 0, 0, 1][..]), None].into_iter());
        rows.push([Some(&b"k2"[..]), Some(&[0u8, 0, 0, 2][..]), Some(&b"x"[..])].into_iter());
        data.extend_from_slice(&rows.clone().all());
        data.extend_from_slice(b"\xff\xff");
        for step in [1, 3, 7, data.len()] {
            let mut split = BinaryRowSplitter::new();
            let mut fields = Vec::new();
            let mut got = Vec::new();
            for piece in data.chunks(step) {
                split.feed(piece);
                while let Some(row) = split.next_row(&mut fields).unwrap() {
                    let f: Vec<Option<Vec<u8>>> = fields
                        .iter()
                        .map(|r| r.clone().map(|r| row[r].to_vec()))
                        .collect();
                    got.push(f);
                }
            }
            split.finish().unwrap();
            assert_eq!(got.len(), 2, "step {step}");
            assert_eq!(got[0][0].as_deref(), Some(&b"k1"[..]));
            assert_eq!(got[0][2], None);
            assert_eq!(got[1][2].as_deref(), Some(&b"x"[..]));
        }
    }

    #[test]
    fn malformed_binary_copy_data_is_an_error_not_a_panic() {
        let mut split = BinaryRowSplitter::new();
        split.feed(b"PGCOPY\nXXXXXXXXXXXXXXXXX");
        assert!(split.next_row(&mut Vec::new()).is_err());
        let mut split = BinaryRowSplitter::new();
        split.feed(BINARY_HEADER);
        split.feed(&[0, 1, 0xff, 0xff, 0xff, 0xfe]);
        assert!(split.next_row(&mut Vec::new()).is_err(), "negative length");
        let mut split = BinaryRowSplitter::new();
        split.feed(BINARY_HEADER);
        split.feed(&[0, 1, 0, 0]);
        assert_eq!(split.next_row(&mut Vec::new()), Ok(None));
        assert!(split.finish().is_err(), "truncated data");
    }

    #[test]
    fn user_defined_types_force_text() {
        assert_eq!(
            CopyFormat::for_type_oids([23, 25, 1184]),
            CopyFormat::Binary
        );
        assert_eq!(CopyFormat::for_type_oids([23, 16390]), CopyFormat::Text);
    }
}
