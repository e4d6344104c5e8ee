//! A small JSON reader: the configuration, token endpoints' and credential
//! services' answers, and the shared records are read with it, typed by
//! the caller as it walks (no tree, no copy of a string without escapes).
//!
//! Why not serde: at 100,000 clients the configuration is 12 MiB read by
//! every VM on every push, and serde's derived visitors, wrapped again for
//! field paths, were a fifth of the filter module and most of its
//! configure time (docs/performance.md, "Configure in V8").
//!
//! Errors carry the field path the reader is at (`routes[0].inject[1]`)
//! and a message in serde_json's words with the position after the token
//! at fault (`invalid type: string "…", expected a boolean at line 3
//! column 78`). A message never holds a value of the document: strings
//! and numbers show as `…`; only field names (`unknown field `x``) and
//! the caller's expectations are written out.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Deeper than this, a value is refused (serde_json's limit too).
const MAX_DEPTH: usize = 128;

/// The bytes a string holds as they are: all but `"`, `\` and control
/// characters (one table lookup a byte on the configuration's 12 MiB).
const PLAIN: [bool; 256] = {
    let mut table = [true; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = false;
        b += 1;
    }
    table[b'"' as usize] = false;
    table[b'\\' as usize] = false;
    table
};

/// Why a document was refused, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// The field path (`clients[3].routes[0]`); empty for the document.
    pub path: String,
    /// What is wrong, ending with ` at line L column C`.
    pub message: String,
}

/// One step of a field path.
#[derive(Debug, Clone)]
enum Step<'a> {
    /// Inside an object, before its first key.
    Open,
    Key(Cow<'a, str>),
    Index(usize),
}

/// What kind of value comes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Null,
    Bool,
    Number,
    String,
    Array,
    Object,
}

/// An object being read: whether a member was read yet, and which of the
/// caller's fields were seen (for a repeat).
#[derive(Debug, Default)]
pub struct Object {
    started: bool,
    seen: u64,
}

impl Object {
    /// An object whose `{` and first member a reader has read already.
    pub fn started() -> Self {
        Self { started: true, seen: 0 }
    }
}

/// An array being read: the index of the next item.
#[derive(Debug, Default)]
pub struct Array {
    next: usize,
}

/// Reads one JSON document from a byte slice.
#[derive(Debug)]
pub struct Reader<'a> {
    bytes: &'a [u8],
    /// The input from byte `text.0` on, when all of that is UTF-8 (checked
    /// once, so a string's text is then a slice of it; a document that is
    /// not is checked string by string, for the position of the fault).
    text: (usize, Option<&'a str>),
    at: usize,
    path: Vec<Step<'a>>,
    /// Just after the closing quote of the last key read: where an error
    /// about the key itself points.
    key_end: usize,
}

type Result<T> = std::result::Result<T, Error>;

impl<'a> Reader<'a> {
    /// A reader at the start of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, text: (0, std::str::from_utf8(bytes).ok()), at: 0, path: Vec::new(), key_end: 0 }
    }

    /// A reader at byte `at` of `bytes` (a value an earlier reader found,
    /// see [`Self::position`]), its path starting at `key`.
    pub fn at(bytes: &'a [u8], at: usize, key: &'a str) -> Self {
        let text = (at, bytes.get(at..).and_then(|rest| std::str::from_utf8(rest).ok()));
        Self { bytes, text, at, path: vec![Step::Key(Cow::Borrowed(key))], key_end: 0 }
    }

    /// The kind of the next value (whitespace skipped, nothing consumed).
    ///
    /// # Errors
    /// At the end of the input, or before a byte that starts no value.
    pub fn kind(&mut self) -> Result<Kind> {
        match self.peek() {
            Some(b'n') => Ok(Kind::Null),
            Some(b't' | b'f') => Ok(Kind::Bool),
            Some(b'-' | b'0'..=b'9') => Ok(Kind::Number),
            Some(b'"') => Ok(Kind::String),
            Some(b'[') => Ok(Kind::Array),
            Some(b'{') => Ok(Kind::Object),
            Some(_) => Err(self.peek_error("expected value")),
            None => Err(self.syntax("EOF while parsing a value")),
        }
    }

    /// Reads a `null` if one comes next: true when it did.
    ///
    /// # Errors
    /// A broken literal, or the end of the input.
    pub fn null(&mut self) -> Result<bool> {
        if self.kind()? != Kind::Null {
            return Ok(false);
        }
        self.literal(b"null")?;
        Ok(true)
    }

    /// Starts reading an object; `expected` names it in a type error.
    ///
    /// # Errors
    /// Anything but an object next.
    pub fn object(&mut self, expected: &str) -> Result<Object> {
        if self.kind()? != Kind::Object {
            return Err(self.invalid_type(expected));
        }
        self.enter()?;
        self.at += 1;
        self.path.push(Step::Open);
        Ok(Object::default())
    }

    /// The next key of `object`, or `None` at its end (when the reader
    /// has left it). Any string is a key here.
    ///
    /// # Errors
    /// Broken JSON.
    pub fn key(&mut self, object: &mut Object) -> Result<Option<Cow<'a, str>>> {
        match self.peek() {
            Some(b'}') => {
                self.at += 1;
                self.path.pop();
                return Ok(None);
            }
            Some(b',') if object.started => {
                self.at += 1;
                if self.peek() == Some(b'}') {
                    return Err(self.peek_error("trailing comma"));
                }
            }
            Some(_) if object.started => return Err(self.peek_error("expected `,` or `}`")),
            Some(_) => {}
            None => return Err(self.syntax("EOF while parsing an object")),
        }
        object.started = true;
        match self.peek() {
            Some(b'"') => {}
            Some(_) => return Err(self.peek_error("key must be a string")),
            None => return Err(self.syntax("EOF while parsing an object")),
        }
        self.at += 1;
        let key = self.string_body()?;
        self.key_end = self.at;
        match self.peek() {
            Some(b':') => self.at += 1,
            Some(_) => return Err(self.peek_error("expected `:`")),
            None => return Err(self.syntax("EOF while parsing an object")),
        }
        if let Some(top) = self.path.last_mut() {
            *top = Step::Key(key.clone());
        }
        Ok(Some(key))
    }

    /// The next key of `object` among `fields` (a struct's), as the
    /// `&'static str` of the list, or `None` at its end.
    ///
    /// # Errors
    /// Broken JSON, a key not in `fields` (`unknown field`), or one seen
    /// before in this object (`duplicate field`).
    pub fn field(&mut self, object: &mut Object, fields: &[&'static str]) -> Result<Option<&'static str>> {
        let Some(key) = self.key(object)? else { return Ok(None) };
        let Some(i) = fields.iter().position(|f| same(f.as_bytes(), key.as_bytes())) else {
            // A misspelt field is named back; anything not shaped like a
            // field name (a pasted secret, a newline, a megabyte) is not,
            // in the message or the path.
            let shown = is_field_name(&key);
            let mut message = if shown {
                format!("unknown field `{key}`, ")
            } else {
                "unknown field (not shown: not a field name), ".to_string()
            };
            if fields.is_empty() {
                message.push_str("there are no fields");
            } else {
                message.push_str("expected ");
                one_of(&mut message, fields);
            }
            return Err(if shown { self.error_at(self.key_end, &message) } else { self.key_error(&message) });
        };
        let bit = 1u64 << (i % 64);
        if object.seen & bit != 0 {
            return Err(self.error_at(self.key_end, &format!("duplicate field `{}`", fields[i])));
        }
        object.seen |= bit;
        Ok(Some(fields[i]))
    }

    /// Starts reading an array; `expected` names it in a type error.
    ///
    /// # Errors
    /// Anything but an array next.
    pub fn array(&mut self, expected: &str) -> Result<Array> {
        if self.kind()? != Kind::Array {
            return Err(self.invalid_type(expected));
        }
        self.enter()?;
        self.at += 1;
        self.path.push(Step::Index(0));
        Ok(Array::default())
    }

    /// Moves to the next item of `array`: its index, or `None` at the end
    /// (when the reader has left it).
    ///
    /// # Errors
    /// Broken JSON.
    pub fn item(&mut self, array: &mut Array) -> Result<Option<usize>> {
        let started = array.next > 0;
        match self.peek() {
            Some(b']') => {
                self.at += 1;
                self.path.pop();
                return Ok(None);
            }
            Some(b',') if started => {
                self.at += 1;
                if self.peek() == Some(b']') {
                    return Err(self.peek_error("trailing comma"));
                }
            }
            Some(_) if started => return Err(self.peek_error("expected `,` or `]`")),
            Some(_) => {}
            None => return Err(self.syntax("EOF while parsing a list")),
        }
        let index = array.next;
        array.next += 1;
        if let Some(top) = self.path.last_mut() {
            *top = Step::Index(index);
        }
        Ok(Some(index))
    }

    /// Reads a string, borrowed from the input unless it has escapes.
    ///
    /// # Errors
    /// Anything but a string next (`expected a string`), or a broken one.
    pub fn string(&mut self) -> Result<Cow<'a, str>> {
        if self.kind()? != Kind::String {
            return Err(self.invalid_type("a string"));
        }
        self.at += 1;
        self.string_body()
    }

    /// Reads `true` or `false`.
    ///
    /// # Errors
    /// Anything else next (`expected a boolean`).
    pub fn bool(&mut self) -> Result<bool> {
        match self.peek() {
            Some(b't') => self.literal(b"true").map(|()| true),
            Some(b'f') => self.literal(b"false").map(|()| false),
            _ => Err(self.invalid_type("a boolean")),
        }
    }

    /// Reads a whole number from 0 to `u64::MAX`.
    ///
    /// # Errors
    /// Anything else next: a negative number (`invalid value`), a
    /// fraction, an exponent or a larger number (`floating point`).
    pub fn u64(&mut self) -> Result<u64> {
        if self.kind()? != Kind::Number {
            return Err(self.invalid_type("u64"));
        }
        let text = self.number()?;
        if let Some(n) = text.bytes().try_fold(0u64, |n, b| {
            let digit = b.checked_sub(b'0').filter(|d| *d < 10)?;
            n.checked_mul(10)?.checked_add(u64::from(digit))
        }) {
            return Ok(n);
        }
        if text.starts_with('-') && text[1..].bytes().all(|b| b.is_ascii_digit()) {
            return Err(self.error("invalid value: integer `…`, expected u64"));
        }
        Err(self.error("invalid type: floating point `…`, expected u64"))
    }

    /// Reads a whole number from `i64::MIN` to `i64::MAX`.
    ///
    /// # Errors
    /// Anything else next.
    pub fn i64(&mut self) -> Result<i64> {
        if self.kind()? != Kind::Number {
            return Err(self.invalid_type("i64"));
        }
        let text = self.number()?;
        let (negative, digits) = match text.strip_prefix('-') {
            Some(digits) => (true, digits),
            None => (false, text),
        };
        let magnitude = digits.bytes().try_fold(0i64, |n, b| {
            let digit = b.checked_sub(b'0').filter(|d| *d < 10)?;
            let n = n.checked_mul(10)?;
            if negative {
                n.checked_sub(i64::from(digit))
            } else {
                n.checked_add(i64::from(digit))
            }
        });
        magnitude.ok_or_else(|| self.error("invalid type: floating point `…`, expected i64"))
    }

    /// Reads past the next value, whatever it is, checking its syntax.
    ///
    /// # Errors
    /// Broken JSON, or nesting deeper than 128.
    pub fn skip(&mut self) -> Result<()> {
        let start = self.at;
        if self.text.1.is_some() && self.skip_plain(self.path.len()).is_some() {
            return Ok(());
        }
        self.at = start;
        self.skip_at(self.path.len())
    }

    /// Checks that nothing but whitespace follows the document.
    ///
    /// # Errors
    /// `trailing characters`.
    pub fn end(&mut self) -> Result<()> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(self.peek_error("trailing characters")),
        }
    }

    /// A refusal of the value just read, at the reader's path and position.
    pub fn error(&self, message: &str) -> Error {
        self.error_at(self.at, message)
    }

    /// A refusal of the key just read (not a name the object may hold),
    /// at the object's path: the key is not written out.
    pub fn key_error(&self, message: &str) -> Error {
        let mut error = self.error_at(self.key_end, message);
        error.path = path_of(&self.path[..self.path.len().saturating_sub(1)]);
        error
    }

    /// A `missing field` refusal of the object just left.
    pub fn missing(&self, field: &str) -> Error {
        self.error(&format!("missing field `{field}`"))
    }

    /// The path the reader is at (`routes[0].inject`).
    pub fn path(&self) -> String {
        path_of(&self.path)
    }

    /// A type error for the next value, which is read past for the
    /// position (serde_json's message, with the value left out).
    ///
    /// # Errors
    /// Always: the type error, or a syntax error met reading the value.
    pub fn invalid_type(&mut self, expected: &str) -> Error {
        let found = match self.peek() {
            Some(b'"') => {
                self.at += 1;
                if let Err(e) = self.string_body() {
                    return e;
                }
                "string \"…\""
            }
            Some(b'-' | b'0'..=b'9') => match self.number() {
                Ok(text) if text.bytes().any(|b| matches!(b, b'.' | b'e' | b'E')) => "floating point `…`",
                Ok(_) => "integer `…`",
                Err(e) => return e,
            },
            Some(b't') => match self.literal(b"true") {
                Ok(()) => "boolean `…`",
                Err(e) => return e,
            },
            Some(b'f') => match self.literal(b"false") {
                Ok(()) => "boolean `…`",
                Err(e) => return e,
            },
            Some(b'n') => match self.literal(b"null") {
                Ok(()) => "null",
                Err(e) => return e,
            },
            Some(b'[') => "sequence",
            Some(b'{') => "map",
            Some(_) => return self.peek_error("expected value"),
            None => return self.syntax("EOF while parsing a value"),
        };
        self.error(&format!("invalid type: {found}, expected {expected}"))
    }

    /// An `unknown variant` refusal of the string just read, naming the
    /// expected ones (never the string).
    pub fn unknown_variant(&self, variants: &[&str]) -> Error {
        self.error(&unknown_variant(variants))
    }

    /// [`Self::unknown_variant`] for the key just read (an enum written
    /// `{"variant": value}`), at the object's path.
    pub fn unknown_variant_key(&self, variants: &[&str]) -> Error {
        self.key_error(&unknown_variant(variants))
    }

    /// Where the reader is in the input, in bytes.
    pub fn position(&self) -> usize {
        self.at
    }

    fn skip_at(&mut self, depth: usize) -> Result<()> {
        match self.kind()? {
            Kind::Null => self.literal(b"null"),
            Kind::Bool if self.peek() == Some(b't') => self.literal(b"true"),
            Kind::Bool => self.literal(b"false"),
            Kind::Number => self.number().map(drop),
            Kind::String => {
                self.at += 1;
                self.skip_string()
            }
            Kind::Array => {
                if depth >= MAX_DEPTH {
                    return Err(self.syntax("recursion limit exceeded"));
                }
                let mut array = self.array("")?;
                while self.item(&mut array)?.is_some() {
                    self.skip_at(depth + 1)?;
                }
                Ok(())
            }
            Kind::Object => {
                if depth >= MAX_DEPTH {
                    return Err(self.syntax("recursion limit exceeded"));
                }
                let mut object = self.object("")?;
                while self.key(&mut object)?.is_some() {
                    self.skip_at(depth + 1)?;
                }
                Ok(())
            }
        }
    }

    /// Past the next value without keeping a path, for a document known
    /// to be UTF-8: `None` at anything but well-formed JSON, and the caller
    /// then reads the value again with [`Self::skip_at`] for the error and
    /// its position. Most of the configuration's 12 MiB is clients, which
    /// the first pass only skips.
    fn skip_plain(&mut self, depth: usize) -> Option<()> {
        let close = match self.peek()? {
            b'"' => {
                self.at += 1;
                return self.skip_plain_string();
            }
            b'{' => b'}',
            b'[' => b']',
            b't' => return self.skip_word(b"true"),
            b'f' => return self.skip_word(b"false"),
            b'n' => return self.skip_word(b"null"),
            b'-' | b'0'..=b'9' => return self.number().ok().map(drop),
            _ => return None,
        };
        if depth >= MAX_DEPTH {
            return None;
        }
        self.at += 1;
        if self.peek()? == close {
            self.at += 1;
            return Some(());
        }
        loop {
            if close == b'}' {
                if self.peek()? != b'"' {
                    return None;
                }
                self.at += 1;
                self.skip_plain_string()?;
                if self.peek()? != b':' {
                    return None;
                }
                self.at += 1;
            }
            self.skip_plain(depth + 1)?;
            match self.peek()? {
                b',' => self.at += 1,
                b if b == close => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    fn skip_plain_string(&mut self) -> Option<()> {
        loop {
            self.plain();
            match *self.bytes.get(self.at)? {
                b'"' => {
                    self.at += 1;
                    return Some(());
                }
                b'\\' => {
                    self.at += 1;
                    self.escape(&mut None).ok()?;
                }
                b if b < 0x20 => return None,
                // Past ASCII in a document checked to be UTF-8.
                _ => self.at += 1,
            }
        }
    }

    fn skip_word(&mut self, word: &[u8]) -> Option<()> {
        (self.bytes.get(self.at..self.at + word.len())? == word).then(|| self.at += word.len())
    }

    fn enter(&self) -> Result<()> {
        if self.path.len() >= MAX_DEPTH {
            return Err(self.syntax("recursion limit exceeded"));
        }
        Ok(())
    }

    /// The next byte after whitespace, which is skipped.
    fn peek(&mut self) -> Option<u8> {
        while let Some(&b) = self.bytes.get(self.at) {
            if !matches!(b, b' ' | b'\n' | b'\t' | b'\r') {
                return Some(b);
            }
            self.at += 1;
        }
        None
    }

    fn literal(&mut self, word: &[u8]) -> Result<()> {
        for &want in word {
            match self.bytes.get(self.at) {
                Some(&b) if b == want => self.at += 1,
                Some(_) => return Err(self.syntax_at(self.at + 1, "expected ident")),
                None => return Err(self.syntax("EOF while parsing a value")),
            }
        }
        Ok(())
    }

    /// A number as written; the grammar is checked, the value is not read.
    fn number(&mut self) -> Result<&'a str> {
        let start = self.at;
        let digits = |r: &mut Self| {
            let from = r.at;
            while r.bytes.get(r.at).is_some_and(u8::is_ascii_digit) {
                r.at += 1;
            }
            r.at - from
        };
        if self.bytes.get(self.at) == Some(&b'-') {
            self.at += 1;
        }
        match self.bytes.get(self.at) {
            Some(b'0') => {
                self.at += 1;
                if self.bytes.get(self.at).is_some_and(u8::is_ascii_digit) {
                    return Err(self.syntax_at(self.at + 1, "invalid number"));
                }
            }
            Some(b'1'..=b'9') => {
                digits(self);
            }
            Some(_) => return Err(self.syntax_at(self.at + 1, "invalid number")),
            None => return Err(self.syntax("EOF while parsing a value")),
        }
        if self.bytes.get(self.at) == Some(&b'.') {
            self.at += 1;
            if digits(self) == 0 {
                return Err(self.syntax_at(self.at + 1, "invalid number"));
            }
        }
        if matches!(self.bytes.get(self.at), Some(b'e' | b'E')) {
            self.at += 1;
            if matches!(self.bytes.get(self.at), Some(b'+' | b'-')) {
                self.at += 1;
            }
            if digits(self) == 0 {
                return Err(self.syntax_at(self.at + 1, "invalid number"));
            }
        }
        // Only ASCII digits, signs, `.` and exponents were read.
        Ok(std::str::from_utf8(&self.bytes[start..self.at]).unwrap_or_default())
    }

    /// Past a string's closing quote, the opening one already read.
    fn skip_string(&mut self) -> Result<()> {
        loop {
            self.plain();
            match self.bytes.get(self.at) {
                Some(b'"') => {
                    self.at += 1;
                    return Ok(());
                }
                Some(b'\\') => {
                    self.at += 1;
                    self.escape(&mut None)?;
                }
                Some(&b) if b < 0x20 => {
                    return Err(
                        self.syntax_at(self.at + 1, "control character (\\u0000-\\u001F) found while parsing a string")
                    )
                }
                Some(_) => self.at += 1,
                None => return Err(self.syntax("EOF while parsing a string")),
            }
        }
    }

    /// A string's text, the opening quote already read: borrowed when it
    /// has no escape.
    fn string_body(&mut self) -> Result<Cow<'a, str>> {
        let start = self.at;
        let mut owned: Option<String> = None;
        let mut from = start;
        loop {
            self.plain();
            match self.bytes.get(self.at) {
                Some(b'"') => {
                    let tail = self.utf8(from, self.at)?;
                    self.at += 1;
                    return Ok(match owned {
                        Some(mut text) => {
                            text.push_str(tail);
                            Cow::Owned(text)
                        }
                        None => Cow::Borrowed(tail),
                    });
                }
                Some(b'\\') => {
                    let text = owned.get_or_insert_with(String::new);
                    text.push_str(self.utf8(from, self.at)?);
                    self.at += 1;
                    self.escape(&mut owned)?;
                    from = self.at;
                }
                Some(&b) if b < 0x20 => {
                    return Err(
                        self.syntax_at(self.at + 1, "control character (\\u0000-\\u001F) found while parsing a string")
                    )
                }
                Some(_) => self.at += 1,
                None => return Err(self.syntax("EOF while parsing a string")),
            }
        }
    }

    /// Past the plain bytes of a string.
    fn plain(&mut self) {
        // Eight bytes at a time while none of them is `"`, `\`, a control
        // character or past ASCII (those end the word loop; the byte loop
        // then decides).
        const ONES: u64 = 0x0101_0101_0101_0101;
        const HIGH: u64 = 0x8080_8080_8080_8080;
        let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
        while let Some(word) = self.bytes.get(self.at..self.at + 8) {
            let mut eight = [0u8; 8];
            eight.copy_from_slice(word);
            let v = u64::from_le_bytes(eight);
            let stop = zero(v ^ (ONES * u64::from(b'"')))
                | zero(v ^ (ONES * u64::from(b'\\')))
                | (v.wrapping_sub(ONES * 0x20) & !v & HIGH)
                | (v & HIGH);
            if stop != 0 {
                break;
            }
            self.at += 8;
        }
        while self.bytes.get(self.at).is_some_and(|&b| PLAIN[usize::from(b)]) {
            self.at += 1;
        }
    }

    fn utf8(&self, from: usize, to: usize) -> Result<&'a str> {
        // Quotes and backslashes are ASCII, so in UTF-8 they and the bytes
        // after them start characters.
        let (base, text) = self.text;
        if let Some(text) = text.and_then(|t| t.get(from.checked_sub(base)?..to.checked_sub(base)?)) {
            return Ok(text);
        }
        std::str::from_utf8(&self.bytes[from..to]).map_err(|e| {
            let bad = from + e.valid_up_to();
            self.syntax_at(bad + 1, "invalid unicode code point")
        })
    }

    /// One escape after its `\`, pushed onto `out` when given.
    fn escape(&mut self, out: &mut Option<String>) -> Result<()> {
        let Some(&b) = self.bytes.get(self.at) else {
            return Err(self.syntax("EOF while parsing a string"));
        };
        self.at += 1;
        let ch = match b {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let first = self.hex4()?;
                let code = match first {
                    0xD800..=0xDBFF => {
                        if self.bytes.get(self.at..self.at + 2) != Some(b"\\u") {
                            return Err(self.syntax("lone leading surrogate in hex escape"));
                        }
                        self.at += 2;
                        let second = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&second) {
                            return Err(self.syntax("lone leading surrogate in hex escape"));
                        }
                        0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)
                    }
                    0xDC00..=0xDFFF => return Err(self.syntax("invalid unicode code point")),
                    code => code,
                };
                char::from_u32(code).ok_or_else(|| self.syntax("invalid unicode code point"))?
            }
            _ => return Err(self.syntax("invalid escape")),
        };
        if let Some(text) = out {
            text.push(ch);
        }
        Ok(())
    }

    fn hex4(&mut self) -> Result<u32> {
        let mut code = 0;
        for _ in 0..4 {
            let Some(&b) = self.bytes.get(self.at) else {
                return Err(self.syntax("EOF while parsing a string"));
            };
            self.at += 1;
            let digit = match b {
                b'0'..=b'9' => b - b'0',
                b'a'..=b'f' => b - b'a' + 10,
                b'A'..=b'F' => b - b'A' + 10,
                _ => return Err(self.syntax("invalid escape")),
            };
            code = code * 16 + u32::from(digit);
        }
        Ok(code)
    }

    /// Broken JSON at the byte just peeked (counted as read, as
    /// serde_json does).
    fn peek_error(&self, message: &str) -> Error {
        self.syntax_at(self.at + 1, message)
    }

    /// Broken JSON here.
    fn syntax(&self, message: &str) -> Error {
        self.syntax_at(self.at, message)
    }

    /// Broken JSON, blamed on the document (an empty path): where the
    /// reader was says little about what broke it.
    fn syntax_at(&self, at: usize, message: &str) -> Error {
        Error { path: String::new(), ..self.error_at(at, message) }
    }

    /// An error with the position after `at` bytes: the line, and the
    /// bytes read on it.
    fn error_at(&self, at: usize, message: &str) -> Error {
        let at = at.min(self.bytes.len());
        let before = &self.bytes[..at];
        let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let line = 1 + before[..line_start].iter().filter(|&&b| b == b'\n').count();
        let column = at - line_start;
        Error { path: self.path(), message: format!("{message} at line {line} column {column}") }
    }
}

/// Byte for byte, inline: field names are short, and a library compare
/// call per candidate field cost more than the compare.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

/// What a field name of keyswap's documents may be, and so what an unknown
/// one may be written back as: 1-64 lower-case letters, digits and `_`.
fn is_field_name(key: &str) -> bool {
    (1..=64).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// `routes[0].inject`, from the steps of a path.
fn path_of(steps: &[Step<'_>]) -> String {
    let mut out = String::new();
    for step in steps {
        match step {
            Step::Open => {}
            Step::Key(key) if out.is_empty() => out.push_str(key),
            Step::Key(key) => {
                out.push('.');
                out.push_str(key);
            }
            Step::Index(i) => {
                let _ = write!(out, "[{i}]");
            }
        }
    }
    out
}

fn unknown_variant(variants: &[&str]) -> String {
    let mut message = "unknown variant `…`, expected ".to_string();
    one_of(&mut message, variants);
    message
}

/// `` `a` ``, `` `a` or `b` ``, `` one of `a`, `b`, `c` `` (serde's words).
fn one_of(out: &mut String, names: &[&str]) {
    match names {
        [one] => {
            let _ = write!(out, "`{one}`");
        }
        [a, b] => {
            let _ = write!(out, "`{a}` or `{b}`");
        }
        _ => {
            out.push_str("one of ");
            for (i, name) in names.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                let _ = write!(out, "`{name}`");
            }
        }
    }
}

/// A whole value, for a small document read by key or JSON pointer (an
/// answer of a token endpoint or a credential service). Strings without
/// escapes are borrowed; numbers are kept as written.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Null,
    Bool(bool),
    Number(&'a str),
    String(Cow<'a, str>),
    Array(Vec<Value<'a>>),
    /// Members in document order; a repeated key's last value counts.
    Object(Vec<(Cow<'a, str>, Value<'a>)>),
}

impl<'a> Value<'a> {
    /// Reads a whole document.
    ///
    /// # Errors
    /// Broken JSON, nesting deeper than 128, or anything after the value.
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        let mut r = Reader::new(bytes);
        let value = Self::read(&mut r)?;
        r.end()?;
        Ok(value)
    }

    fn read(r: &mut Reader<'a>) -> Result<Self> {
        Ok(match r.kind()? {
            Kind::Null => {
                r.literal(b"null")?;
                Value::Null
            }
            Kind::Bool => Value::Bool(r.bool()?),
            Kind::Number => Value::Number(r.number()?),
            Kind::String => Value::String(r.string()?),
            Kind::Array => {
                let mut items = Vec::new();
                let mut a = r.array("")?;
                while r.item(&mut a)?.is_some() {
                    items.push(Self::read(r)?);
                }
                Value::Array(items)
            }
            Kind::Object => {
                let mut members = Vec::new();
                let mut o = r.object("")?;
                while let Some(key) = r.key(&mut o)? {
                    members.push((key, Self::read(r)?));
                }
                Value::Object(members)
            }
        })
    }

    /// The member `key` of an object (its last value, as serde_json has
    /// it), if this is an object that has one.
    pub fn get(&self, key: &str) -> Option<&Value<'a>> {
        match self {
            Value::Object(members) => members.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The value at an RFC 6901 JSON pointer (`""` is the whole value,
    /// `/a/0/b~1c` a path), read as serde_json's `Value::pointer` does.
    pub fn pointer(&self, pointer: &str) -> Option<&Value<'a>> {
        if pointer.is_empty() {
            return Some(self);
        }
        let rest = pointer.strip_prefix('/')?;
        rest.split('/').try_fold(self, |target, token| {
            let token = token.replace("~1", "/").replace("~0", "~");
            match target {
                Value::Object(_) => target.get(&token),
                Value::Array(items) => {
                    let index = (!token.starts_with('+') && (token == "0" || !token.starts_with('0')))
                        .then(|| token.parse::<usize>().ok())
                        .flatten()?;
                    items.get(index)
                }
                _ => None,
            }
        })
    }

    /// The text of a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(text) => Some(text),
            _ => None,
        }
    }

    /// A number's value, close enough for seconds and timestamps.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Number(text) => number_f64(text),
            _ => None,
        }
    }
}

/// The value of a number written in JSON's grammar (`-1.5e3`), from its
/// first 19 significant digits; `None` for anything else. Accurate to a
/// few units in the 16th digit: enough for a lifetime in seconds or a
/// Unix time, without a full decimal-to-float conversion in the module.
pub fn number_f64(text: &str) -> Option<f64> {
    let mut r = Reader::new(text.as_bytes());
    if r.number().ok()?.len() != text.len() {
        return None;
    }
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa_text, exponent) = match text.find(['e', 'E']) {
        Some(at) => (&text[..at], text[at + 1..].parse::<i32>().ok()?),
        None => (text, 0),
    };
    let (mut mantissa, mut scale, mut digits) = (0u64, exponent, 0);
    let mut fraction = false;
    for b in mantissa_text.bytes() {
        if b == b'.' {
            fraction = true;
            continue;
        }
        if mantissa == 0 && b == b'0' {
            scale -= i32::from(fraction);
            continue;
        }
        if digits < 19 {
            mantissa = mantissa * 10 + u64::from(b - b'0');
            digits += 1;
            scale -= i32::from(fraction);
        } else {
            scale += i32::from(!fraction);
        }
    }
    let value = mantissa as f64 * 10f64.powi(scale);
    Some(if negative { -value } else { value })
}

/// Writes `text` as a JSON string, quotes included.
pub fn write_string(out: &mut String, text: &str) {
    out.push('"');
    for ch in text.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_bool_field(json: &str) -> Result<bool> {
        let mut r = Reader::new(json.as_bytes());
        let mut o = r.object("an object")?;
        let mut value = false;
        while let Some(field) = r.field(&mut o, &["on"])? {
            if field == "on" {
                value = r.bool()?;
            }
        }
        r.end()?;
        Ok(value)
    }

    #[test]
    fn positions_and_messages_follow_serde_json() {
        let err = read_bool_field("{\"on\": \"sk-secret\"}").unwrap_err();
        assert_eq!(err.path, "on");
        assert_eq!(err.message, "invalid type: string \"…\", expected a boolean at line 1 column 18");
        let err = read_bool_field("{\"on\": true,\n}").unwrap_err();
        assert_eq!(err.message, "trailing comma at line 2 column 1");
        let err = read_bool_field("{\"on\": true}\n{}").unwrap_err();
        assert_eq!(err.message, "trailing characters at line 2 column 1");
        let err = read_bool_field("{\"off\": true}").unwrap_err();
        assert_eq!(err.message, "unknown field `off`, expected `on` at line 1 column 6");
        for pasted in ["sk-live-Secret\\nforged line", "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0.S3CR3T", &"x".repeat(65)] {
            let err = read_bool_field(&format!("{{\"{pasted}\": true}}")).unwrap_err();
            assert_eq!(err.path, "", "{pasted}: {err:?}");
            assert!(err.message.starts_with("unknown field (not shown: not a field name), expected `on`"), "{err:?}");
            assert!(!err.message.contains(&pasted[..8]), "{err:?}");
        }
        let err = read_bool_field("{\"on\": true, \"on\": false}").unwrap_err();
        assert!(err.message.starts_with("duplicate field `on`"), "{err:?}");
        assert_eq!(read_bool_field(" {\"on\" : true } "), Ok(true));
    }

    #[test]
    fn strings_borrow_unless_escaped_and_decode_every_escape() {
        let mut r = Reader::new(br#""plain""#);
        assert!(matches!(r.string(), Ok(Cow::Borrowed("plain"))));
        let mut r = Reader::new(br#""a\"b\\c\/d\n\u00e9\ud83d\ude00""#);
        assert_eq!(r.string().unwrap(), "a\"b\\c/d\né😀");
        for (bad, message) in [
            (&br#""\ud83d""#[..], "lone leading surrogate"),
            (br#""\x""#, "invalid escape"),
            (b"\"a\x01\"", "control character"),
            (b"\"a", "EOF while parsing a string"),
            (b"\"\xff\"", "invalid unicode code point"),
        ] {
            let err = Reader::new(bad).string().unwrap_err();
            assert!(err.message.starts_with(message), "{bad:?}: {err:?}");
        }
    }

    #[test]
    fn whole_numbers_and_everything_else() {
        assert_eq!(Reader::new(b"18446744073709551615").u64(), Ok(u64::MAX));
        for (text, message) in [
            ("18446744073709551616", "invalid type: floating point `…`, expected u64"),
            ("1.5", "invalid type: floating point `…`, expected u64"),
            ("-3", "invalid value: integer `…`, expected u64"),
            ("\"7\"", "invalid type: string \"…\", expected u64"),
            ("01", "invalid number"),
            ("1.", "invalid number"),
        ] {
            let err = Reader::new(text.as_bytes()).u64().unwrap_err();
            assert!(err.message.starts_with(message), "{text}: {err:?}");
            assert!(!err.message.contains(text), "{text} echoed: {err:?}");
        }
    }

    #[test]
    fn skip_checks_syntax_and_depth() {
        let mut r = Reader::new(br#"{"a": [1, {"b": null}, "x", true], "c": {}} "#);
        assert_eq!(r.skip(), Ok(()));
        assert_eq!(r.end(), Ok(()));
        for bad in [&b"[1,]"[..], b"{\"a\" 1}", b"[1 2]", b"{1: 2}", b"[tru]", b"{\"a\": 1,}"] {
            assert!(Reader::new(bad).skip().is_err(), "{bad:?}");
        }
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(Reader::new(deep.as_bytes()).skip().unwrap_err().message.starts_with("recursion limit exceeded"));
    }

    #[test]
    fn the_quick_skip_ends_and_fails_where_the_full_one_does() {
        // `skip` takes a path-free walk first and falls back to the full
        // reading at anything it does not take: both must agree on where a
        // value ends and on every error, or the first pass over the clients
        // would accept or place differently than the second.
        let deep_ok = "[".repeat(127) + &"]".repeat(127);
        let deep_bad = "[".repeat(128) + &"]".repeat(128);
        let documents: &[&[u8]] = &[
            br#"{"a": [1, -2.5e3, {"b": null}, "x\"y\u00e9", true, false], "c": {}} , 1"#,
            b" [ ] ",
            b"{}x",
            "[\"\u{e9}\u{1f600}\"]".as_bytes(),
            b"[\"a\x01\"]",
            br#"["a\q"]"#,
            br#"["\ud800"]"#,
            b"[01]",
            b"[1.]",
            b"[-]",
            br#"{"a":1 "b":2}"#,
            br#"{"a":1,}"#,
            b"[1,]",
            b"[nul]",
            b"[\"abc",
            b"{\"a\"",
            b"[\xff]",
            b"[\"\xff\"]",
            deep_ok.as_bytes(),
            deep_bad.as_bytes(),
        ];
        for &doc in documents {
            let mut quick = Reader::new(doc);
            let mut full = Reader::new(doc);
            let full_result = full.skip_at(0);
            assert_eq!(quick.skip(), full_result, "{:?}", String::from_utf8_lossy(doc));
            if full_result.is_ok() {
                assert_eq!(quick.position(), full.position(), "{:?}", String::from_utf8_lossy(doc));
            }
        }
    }

    #[test]
    fn paths_name_keys_and_indices() {
        let json = br#"{"routes": [{"name": "a"}, {"name": 5}]}"#;
        let mut r = Reader::new(json);
        let mut o = r.object("an object").unwrap();
        let err = (|| -> Result<()> {
            while r.key(&mut o)?.is_some() {
                let mut a = r.array("a sequence")?;
                while r.item(&mut a)?.is_some() {
                    let mut route = r.object("a route")?;
                    while r.key(&mut route)?.is_some() {
                        r.string()?;
                    }
                }
            }
            Ok(())
        })()
        .unwrap_err();
        assert_eq!(err.path, "routes[1].name");
    }

    #[test]
    fn values_by_key_and_pointer_as_serde_json_reads_them() {
        let doc = br#"{"a": {"b/c": [10, {"d~e": "x"}]}, "n": 1.5e3, "k": 1, "k": 2, "neg": -0.25}"#;
        let v = Value::parse(doc).unwrap();
        assert_eq!(v.pointer("/a/b~1c/1/d~0e").and_then(Value::as_str), Some("x"));
        assert_eq!(v.pointer("/a/b~1c/0").and_then(Value::as_f64), Some(10.0));
        for missing in ["/a/b~1c/01", "/a/b~1c/+1", "/a/b~1c/2", "a", "/x", "/n/0"] {
            assert_eq!(v.pointer(missing), None, "{missing}");
        }
        assert_eq!(v.pointer(""), Some(&v));
        assert_eq!(v.get("n").and_then(Value::as_f64), Some(1500.0));
        assert_eq!(v.get("k").and_then(Value::as_f64), Some(2.0), "the last of a repeated key");
        assert_eq!(v.get("neg").and_then(Value::as_f64), Some(-0.25));
        assert!(Value::parse(b"{\"a\": 1} x").is_err());
    }

    #[test]
    fn numbers_read_close_to_their_value() {
        for (text, want) in [
            ("3600", 3600.0),
            ("0.5", 0.5),
            ("0.001", 0.001),
            ("1e3", 1000.0),
            ("2.5E-1", 0.25),
            ("1767225600", 1_767_225_600.0),
            ("123456789012345678901234", 1.234_567_890_123_456_8e23),
        ] {
            let got = number_f64(text).unwrap();
            assert!((got - want).abs() <= want.abs() * 1e-15, "{text}: {got}");
        }
        for bad in ["", "-", "1.", ".5", "+1", "1e", "inf", "NaN", "1 "] {
            assert_eq!(number_f64(bad), None, "{bad:?}");
        }
        assert_eq!(Reader::new(b"-9223372036854775808").i64(), Ok(i64::MIN));
        assert!(Reader::new(b"9223372036854775808").i64().is_err());
    }

    #[test]
    fn written_strings_read_back() {
        let text = "quote \" back \\ nl \n ctl \u{1} é";
        let mut out = String::new();
        write_string(&mut out, text);
        assert_eq!(Reader::new(out.as_bytes()).string().unwrap(), text);
    }
}
